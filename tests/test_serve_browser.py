"""The web chat page in a real browser: headless Chromium (selenium + chromedriver) loads
``/`` from a real server, sends messages and watches the streamed replies arrive; Stop
aborts a reply, and a guarded server's page takes the API key. The switch colours an
answer's tokens by the probabilities the API returns, each answer shows its speed, the
attention button opens the server's map, and Markdown renders through the vendored marked
and DOMPurify without letting a model's HTML run. Skips, saying why, when Chromium,
chromedriver or selenium is missing (``make test`` installs Debian's packages)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import running_server, tiny_model

from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
openai = pytest.importorskip("openai")

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "the browser test needs Chromium and chromedriver on PATH (Debian: apt-get install "
        "chromium chromium-driver; `make test` does this when it runs as root)",
        allow_module_level=True,
    )

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 30  # seconds; generous, for a shared 2-core machine


@pytest.fixture(scope="module")
def model(chatml_tokenizer: BPETokenizer) -> GPT:
    return tiny_model(chatml_tokenizer.vocab_size, block_size=128)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(flag)
    options.add_argument("--disable-dev-shm-usage")  # containers have a small /dev/shm
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as e:  # a browser that cannot start here is an environment problem
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait(driver: Any, condition: Any) -> Any:
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition)


def set_field(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def send(driver: Any, text: str) -> Any:
    """Type a message, press Enter, and return the new reply bubble once it is done."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before)
    reply = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    wait(driver, lambda d: reply.get_attribute("data-done") == "true")
    return reply


def open_page(driver: Any, url: str) -> None:
    """Load the page, wait until it has asked the server for the model, set greedy."""
    driver.get(url + "/")
    wait(driver, lambda d: d.find_element(By.ID, "model").text != "connecting…")
    if driver.find_element(By.ID, "settings").get_attribute("open") is None:
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    set_field(driver, "temperature", "0")


def test_page_streams_replies_and_keeps_history(
    browser: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    with running_server(model, chatml_tokenizer) as s:
        open_page(browser, s.url)
        wait(browser, lambda d: d.find_element(By.ID, "model").text.startswith("tiny"))
        set_field(browser, "max-tokens", "8")
        api = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        history: list[dict[str, str]] = []
        for text in ("hello", "and again"):
            reply = send(browser, text)
            history.append({"role": "user", "content": text})
            expected = api.chat.completions.create(
                model="tiny", messages=history, max_tokens=8, temperature=0
            )
            content = expected.choices[0].message.content
            assert reply.get_attribute("data-text") == content  # the same text, streamed
            assert int(reply.get_attribute("data-chunks")) >= 1
            history.append({"role": "assistant", "content": content})
        assert "8 tokens" in browser.find_element(By.ID, "status").text
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".message.user")
        assert [b.text for b in bubbles] == ["hello", "and again"]


def test_stop_button_cancels_the_reply(
    browser: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: time.sleep(0.02))
    try:
        with running_server(model, chatml_tokenizer) as s:
            open_page(browser, s.url)
            set_field(browser, "max-tokens", "100")  # 2 s or more at this pace
            browser.find_element(By.ID, "input").send_keys("hello", Keys.ENTER)
            reply = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant"))
            wait(browser, lambda d: int(reply.get_attribute("data-chunks") or 0) >= 1)
            browser.find_element(By.ID, "stop").click()
            wait(browser, lambda d: reply.get_attribute("data-done") == "true")
            assert "(stopped)" in reply.text
            deadline = time.monotonic() + 5
            while s.engine.stats.active and time.monotonic() < deadline:
                time.sleep(0.02)
            assert s.engine.stats.active == 0  # the server cancelled the generation
            assert s.engine.stats.generated_tokens < 100
    finally:
        handle.remove()


def test_page_asks_for_the_api_key(
    browser: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    with running_server(model, chatml_tokenizer, api_key="sekret") as s:
        open_page(browser, s.url)
        wait(browser, lambda d: "API key" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "api-key").send_keys("sekret", Keys.TAB)
        wait(browser, lambda d: d.find_element(By.ID, "model").text.startswith("tiny"))
        set_field(browser, "max-tokens", "4")
        reply = send(browser, "hello")
        assert reply.get_attribute("textContent")
        assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")


def test_token_colours_speed_and_attention_map(
    browser: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    with running_server(model, chatml_tokenizer, name="models/tiny-chat.Q4_1.gguf") as s:
        open_page(browser, s.url)
        header = browser.find_element(By.ID, "model").text
        assert header == "tiny-chat.Q4_1"  # the model's name, not the path it was loaded from
        set_field(browser, "max-tokens", "8")
        reply = send(browser, "hello")
        api = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        expected = api.chat.completions.create(
            model="models/tiny-chat.Q4_1.gguf",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        tokens = expected.choices[0].logprobs.content
        assert not reply.find_elements(By.CSS_SELECTOR, ".tok")  # off: the text, rendered
        browser.find_element(By.ID, "colour").click()
        spans = reply.find_elements(By.CSS_SELECTOR, ".body .tok")
        assert [sp.get_attribute("textContent") for sp in spans] == [t.token for t in tokens]
        for span, token in zip(spans, tokens, strict=True):
            p = math.exp(token.logprob)
            assert f"p{min(9, math.floor(p * 10))}" in span.get_attribute("class").split()
            title = span.get_attribute("title").splitlines()
            assert title[0] == f"p {p:.3f}" and len(title) == 1 + len(token.top_logprobs)
        browser.find_element(By.ID, "colour").click()
        assert not reply.find_elements(By.CSS_SELECTOR, ".tok")
        stats = reply.find_element(By.CSS_SELECTOR, ".stats")
        assert "tokens/s" in stats.text and "first token" in stats.text
        assert float(stats.get_attribute("data-tokens-per-second")) > 0
        assert int(stats.get_attribute("data-ttft-ms")) >= 0
        reply.find_element(By.CSS_SELECTOR, "button.attention").click()
        image = browser.find_element(By.ID, "attention-image")
        wait(browser, lambda d: (image.get_attribute("src") or "").startswith("data:image/png"))
        wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
        assert browser.find_element(By.ID, "attention").get_attribute("open") is not None
        assert "answer tokens" in browser.find_element(By.ID, "attention-note").text
        browser.find_element(By.ID, "attention-close").click()


MALICIOUS = """# Title

Some **bold** text and `code`.

```python
print("<b>not bold</b>")
```

<img src="x" onerror="window.pwned = 1"><script>window.pwned = 2</script>
[link](javascript:window.pwned=3) <a href="https://example.org" onclick="window.pwned=4">a</a>
"""


def test_markdown_renders_and_model_html_cannot_run(
    browser: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    with running_server(model, chatml_tokenizer) as s:
        open_page(browser, s.url)
        html = browser.execute_script(
            "const el = document.createElement('div'); document.body.appendChild(el);"
            "window.gptkitChat.renderMarkdown(el, arguments[0]); return el.innerHTML;",
            MALICIOUS,
        )
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
        assert '<pre><code class="language-python">' in html
        assert "&lt;b&gt;not bold&lt;/b&gt;" in html  # code stays code
        for bad in ("<script", "onerror", "onclick", "javascript:"):
            assert bad not in html
        time.sleep(0.2)  # an image's error event would have fired by now
        assert browser.execute_script("return window.pwned === undefined")
        call = {"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
        shown = browser.execute_script(
            "const r = window.gptkitChat.renderMessage; return [r(arguments[0]).textContent,"
            " r(arguments[1]).textContent, window.gptkitChat.displayName('a/b/c.gguf')];",
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
        )
        assert "tool call" in shown[0] and "get_weather" in shown[0] and "Paris" in shown[0]
        assert "tool result (c1)" in shown[1] and '{"temp": 18}' in shown[1]
        assert shown[2] == "c"
