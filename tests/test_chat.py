"""Chat templates render as transformers renders them; a chat session keeps and trims history."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import tiny_model

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.generate.chat import CHATML, ChatSession, render_chat
from gptkit.tokenizer import BPETokenizer

# Templates that use what real ones use: loops with loop.first/last, conditionals on roles,
# tojson, loop controls, raise_exception, bos/eos tokens.
TEMPLATES = {
    "chatml": CHATML,
    "system-default": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-like": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "[{{ m['role'] | upper }}] {{ m['content'] | trim }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    ),
    "json": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3? ünïcode 中文  "},
    ],
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_transformers(name: str, generation_prompt: bool) -> None:
    ref = pytest.importorskip("transformers.utils.chat_template_utils")
    for messages in CONVERSATIONS:
        ours = render_chat(messages, TEMPLATES[name], generation_prompt, "<s>", "</s>")
        theirs = ref.render_jinja_template(
            conversations=[messages],
            chat_template=TEMPLATES[name],
            add_generation_prompt=generation_prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
        theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
        assert ours == theirs


def test_template_errors_are_clear() -> None:
    # (a tool message reaches a template that reads no tools as a <tool_response> user turn)
    with pytest.raises(GptkitError, match="unknown role narrator"):
        render_chat([{"role": "narrator", "content": "x"}], TEMPLATES["llama-like"])
    with pytest.raises(GptkitError, match="does not parse"):
        render_chat([{"role": "user", "content": "x"}], "{% for %}")
    with pytest.raises(GptkitError, match="'role' and a 'content'"):
        render_chat([{"text": "x"}])


def test_session_keeps_history_and_resets(chatml_tokenizer: BPETokenizer) -> None:
    model = tiny_model(chatml_tokenizer.vocab_size, block_size=256)
    chat = ChatSession(model, chatml_tokenizer, system="Be brief.", max_new_tokens=8, temperature=0)
    first = "".join(chat.send("hello"))
    "".join(chat.send("again"))
    assert [m["role"] for m in chat.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert chat.messages[2]["content"] == first.strip()
    prompt = chat.prompt()
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n") and "again" in prompt
    ids = chatml_tokenizer.encode(prompt)
    assert ids.count(chatml_tokenizer.special_tokens["<|im_start|>"]) == 6
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_session_drops_oldest_turns_to_fit(chatml_tokenizer: BPETokenizer) -> None:
    model = tiny_model(chatml_tokenizer.vocab_size, block_size=96)
    chat = ChatSession(model, chatml_tokenizer, system="S", max_new_tokens=16, temperature=0)
    for i in range(6):
        "".join(chat.send(f"message number {i} " * 2))
        prompt = chat.prompt()
        assert len(chatml_tokenizer.encode(prompt)) <= 96 - 16
        assert prompt.startswith("<|im_start|>system\nS")  # the system message stays
    chat.messages.append({"role": "user", "content": "last question"})
    prompt = chat.prompt()
    assert "last question" in prompt and "message number 0" not in prompt


def test_chat_command_reads_stdin(
    chatml_tokenizer: BPETokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    save_checkpoint(
        tmp_path, tiny_model(chatml_tokenizer.vocab_size, block_size=128), chatml_tokenizer
    )
    stdin = io.StringIO("hello\n/reset\nhi again\n/exit\nignored\n")
    monkeypatch.setattr("sys.stdin", stdin)
    code = main(["chat", "--model", str(tmp_path), "--max-new-tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0
    before, after = out.split("(conversation reset)\n")
    assert before.strip() and after.strip()  # a reply before and after the reset
    assert stdin.read() == "ignored\n"  # /exit left the loop
