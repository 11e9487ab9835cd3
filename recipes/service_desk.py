"""A service-desk assistant that calls tools: the OpenAI client, a gptkit server, and a fake
service backend built from Schema-Guided Dialogue's ``schema.json``.

The tools are SGD's intents (gptkit.data.dialogue.service_tools); when the model calls one,
the fake backend answers it as the real service would in shape: the intent's result slots,
filled from the call's arguments, from the slot's possible values, or with a made-up value;
the result goes back as a ``tool`` message and the model answers from it. Run it against a
model fine-tuned by recipes/customer_support.sh:

    .venv/bin/python recipes/service_desk.py --model runs/recipes/customer_support/run/merged \\
        --services Restaurants_2 --say "Book a table for 2 at Sino in San Jose at 11:30 today"

(``--url`` talks to a server that is already running instead; without ``--say`` it asks for
the user's turns on the terminal.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from gptkit.data.dialogue import SYSTEM, read_schema, service_tools


class FakeServices:
    """Answers calls to SGD intents with results of the right shape (see the docstring)."""

    def __init__(self, schema: dict[str, dict[str, Any]], services: list[str]):
        unknown = [s for s in services if s not in schema]
        if unknown:
            raise SystemExit(f"unknown services {unknown}; choose from {sorted(schema)}")
        self.intents = {i["name"]: (schema[s], i) for s in services for i in schema[s]["intents"]}
        self.tools = [t for s in services for t in service_tools(schema[s])]

    def call(self, name: str, arguments: dict[str, Any]) -> list[dict[str, str]]:
        """The results of one call: one record of the intent's result slots."""
        if name not in self.intents:
            return [{"error": f"no such method {name}"}]
        service, intent = self.intents[name]
        slots = {s["name"]: s for s in service["slots"]}
        record = {}
        for slot in intent["result_slots"]:
            if slot in arguments:
                record[slot] = str(arguments[slot])
            elif slots[slot]["possible_values"]:
                record[slot] = slots[slot]["possible_values"][0]
            else:
                record[slot] = f"<{slot}>"
        return [record]


def start_server(model: str, port: int) -> subprocess.Popen:
    """``gptkit serve`` on ``port``, once it answers /v1/models."""
    exe = Path(sys.executable).with_name("gptkit")
    proc = subprocess.Popen([str(exe), "serve", "--model", model, "--port", str(port)])
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server did not start; see its output above") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer within 5 minutes")


def turn(
    client: Any, model: str, messages: list[dict], desk: FakeServices, max_calls: int = 3
) -> str:
    """The assistant's answer to the last user message: calls are run on the fake backend
    and their results sent back until it answers in text (at most ``max_calls`` calls)."""
    for _ in range(max_calls + 1):
        out = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=desk.tools,
            temperature=0,
            max_tokens=120,
        )
        msg = out.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if not msg.tool_calls:
            return msg.content or ""
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments)
            result = desk.call(call.function.name, args)
            print(f"  [call] {call.function.name}({args}) -> {result}")
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
            )
    return "(no answer after the calls)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--url", help="a running gptkit server (default: start one)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", default=os.environ.get("GPTKIT_DATA", "../shared/data"))
    parser.add_argument("--services", default="Restaurants_2", help="comma-separated")
    parser.add_argument("--say", action="append", help="a user turn (repeat for several)")
    args = parser.parse_args()

    import openai

    schema = read_schema(Path(args.data) / "customer_support" / "schema.json")
    desk = FakeServices(schema, args.services.split(","))
    server = None if args.url else start_server(args.model, args.port)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=600)
        model = client.models.list().data[0].id
        messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        turns = iter(args.say) if args.say else iter(lambda: input("you> "), "")
        for text in turns:
            print(f"user> {text}")
            messages.append({"role": "user", "content": text})
            print(f"assistant> {turn(client, model, messages, desk)}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
