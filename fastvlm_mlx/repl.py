"""The `chat` command's loop: questions from the terminal (readline) or stdin, /commands, answers out.

Answers go to stdout, streamed, or as one JSON object per turn; prompts and notices go to stderr.
A bad question or image is reported and the chat goes on; Ctrl-C stops the answer being written.
"""

import json
import sys
from collections.abc import Callable, Iterator

import click

from fastvlm_mlx.chat import ChatSession
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.images import read_image
from fastvlm_mlx.prompt import check_text

COMMANDS = "/image PATH switches image (a new conversation), /reset starts over, /quit ends"


def run_chat(session: ChatSession, options: dict, as_json: Callable | None = None) -> None:
    """Answer each question on `session`; `as_json` turns a GenerationResult into the object to print."""
    interactive = as_json is None and sys.stdin.isatty()
    if interactive:
        click.echo(f"Ask about the image; {COMMANDS}.", err=True)
    for line in _lines(interactive):
        question = line.strip()
        if not question:
            continue
        try:
            if question.startswith("/"):
                if not _command(session, question):
                    return
                continue
            check_text(question, "the question")
            if as_json is None:
                _stream(session, question, options)
            else:
                click.echo(json.dumps({**as_json(session.ask(question, **options)), "turn": session.turns}))
        except UserError as error:
            message = " ".join(str(error).split())
            click.echo(f"Error: {message}", err=True)
            if as_json is not None:
                click.echo(json.dumps({"error": message, "turn": session.turns + 1}))


def _lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    prompt = "> " if sys.stdout.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            click.echo(err=True)
            return


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; False to end the chat."""
    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        click.echo("(new conversation)", err=True)
    elif name == "/image" and argument.strip():
        session.reset(read_image(argument.strip()))
        click.echo(f"(new conversation about {argument.strip()})", err=True)
    else:
        click.echo(f"unknown command {line!r}; {COMMANDS}", err=True)
    return True


def _stream(session: ChatSession, question: str, options: dict) -> None:
    try:
        for response in session.stream(question, **options):
            click.echo(response.text, nl=False)
    except KeyboardInterrupt:
        click.echo(" (stopped)", nl=False, err=True)
    click.echo()
