"""`deploykit chat`: talk to any OpenAI-compatible endpoint from the terminal."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from deploykit.cli.console import err


def chat(
    url: str = typer.Option("http://127.0.0.1:8000", help="The endpoint (with or without /v1)."),
    model: str = typer.Option(None, help="Model name (default: the endpoint's first model)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Ask one question, print the answer, exit."),
    system: str = typer.Option(None, help="A system message to start the conversation with."),
    max_tokens: int = typer.Option(512, help="Most tokens per answer."),
    temperature: float = typer.Option(None, help="Sampling temperature (0: greedy; default: the model's own)."),
    api_key: str = typer.Option(None, envvar="OPENAI_API_KEY", help="API key, if the endpoint needs one."),
) -> None:
    """Chat with a model, streaming its answers as they are generated. /exit or Ctrl-D ends the chat.

    Examples:

      deploykit chat                                   # the local gateway

      deploykit chat -p "What is the capital of France?"

      deploykit chat --url https://api.openai.com --model gpt-4o-mini
    """
    from deploykit.chat import connect, pick_model, stream_chat  # openai takes a second to import

    client = connect(url, api_key)
    name = pick_model(client, model)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params: dict[str, object] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature

    def ask(text: str) -> None:
        messages.append({"role": "user", "content": text})
        answer = []
        for piece in stream_chat(client, name, messages, **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
            answer.append(piece)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})

    if prompt is not None:
        ask(prompt)
        return
    err.print(f"Chatting with [bold]{escape(name)}[/bold] at {escape(url)}. /exit or Ctrl-D ends.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if text.strip() in {"/exit", "/quit"}:
            break
        if text.strip():
            ask(text)
