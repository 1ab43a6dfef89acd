"""`chatbus chat`: one question, or a session that remembers, answered in-process."""

from __future__ import annotations

import argparse
import sys
import uuid
from contextlib import AsyncExitStack

from core.chat import Caller, ChatService
from core.chat_input import ChatInput, stored_turns_wanted
from core.cli.running import loop_runner, run
from core.config import Config
from core.errors import ChatError, StoreUnavailable
from core.providers import GenerationParams
from core.registry import Failure
from core.turn import TurnResult
from core.validation import query_problem

LEAVE_WORDS = ("exit", "quit")  # as `llm chat`: these end an interactive session too


def chat_command(config: Config, args: argparse.Namespace) -> int:
    if args.question is None:
        return _session(config, args)
    question = sys.stdin.read().rstrip() if args.question == "-" else args.question
    conversation = args.conversation or uuid.uuid4().hex  # so a next call can continue it
    request = _request(config, args, question, conversation)
    if request is None:
        return 2
    return run(_chat_once(config, request))


def _request(
    config: Config, args: argparse.Namespace, question: str, conversation: str
) -> ChatInput | None:
    """The chat input for one question; None (the problem said) when it is not valid."""
    problem = query_problem(question, config.chat.max_query_chars)
    if problem is not None:
        print(f"chatbus: query: {problem}", file=sys.stderr)
        return None
    history_len = args.history_len
    if history_len is None:
        history_len = config.chat.default_history_len
    # System messages alone: the stored turns follow them.
    history = ({"role": "system", "content": args.system},) if args.system else ()
    return ChatInput(
        query=question,
        history=history,
        conversation_id=conversation,
        history_len=stored_turns_wanted(conversation, history, history_len),
        model=args.model,
        prompt_name=args.prompt_name,
        stream=True,
        params=GenerationParams(temperature=args.temperature),
    )


async def _chat_once(config: Config, request: ChatInput) -> int:
    from core.app import open_service

    async with open_service(config) as service:
        result = await _answer(service, request)
    if result is None:
        return 2
    if result.error is not None:
        return 1
    print(f"[conversation {request.conversation_id}, message {result.message_id}]", file=sys.stderr)
    return 0


async def _answer(service: ChatService, request: ChatInput) -> TurnResult | None:
    """Stream one answer to stdout and say on stderr which model answered, after which
    failures, or why there is no answer; None when the chat could not start."""

    async def send(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        async with service.start(request, Caller(request_id=uuid.uuid4().hex)) as turn:
            result = await turn.run(send)
    except (ChatError, StoreUnavailable) as exc:
        print(f"chatbus: {exc}", file=sys.stderr)
        return None
    print()
    failures = list(result.failures)
    if result.error is not None:
        if not failures or failures[-1].error is not result.error:
            failures.append(Failure(result.model, result.error))  # after text, a time limit
        print(f"chatbus: {result.error.type}: {_said(failures)}", file=sys.stderr)
    elif failures:
        print(f"[{_said(failures)}; answered by {result.model}]", file=sys.stderr)
    return result


def _said(failures: list[Failure]) -> str:
    """`model: error` for each model and error, with how many attempts failed that way."""
    counted: dict[tuple[str, str], int] = {}
    for failure in failures:
        key = (failure.model, str(failure.error))
        counted[key] = counted.get(key, 0) + 1
    return "; ".join(
        f"{model}: {error}" + (f" ({count} attempts)" if count > 1 else "")
        for (model, error), count in counted.items()
    )


def _session(config: Config, args: argparse.Namespace) -> int:
    """An interactive chat, as `llm chat`: one conversation, each question a line, until
    Ctrl-D (or `exit`). The service stays open between questions; its loop runs only while
    a question is answered (and at the end), not while the terminal is read, so background
    work (an answer's end retried after a store failure) waits for the next question."""
    from core.app import open_service

    conversation = args.conversation or uuid.uuid4().hex
    with loop_runner() as runner:
        stack = AsyncExitStack()
        service = runner.run(stack.enter_async_context(open_service(config)))
        try:
            model = args.model or config.default_model
            print(f"Chatting with {model}, conversation {conversation}.", file=sys.stderr)
            print("Type 'exit' or 'quit' (or press Ctrl-D) to leave.", file=sys.stderr)
            while (question := _next_question()) is not None:
                request = _request(config, args, question, conversation) if question else None
                if request is not None:
                    runner.run(_answer(service, request))
        finally:
            runner.run(stack.aclose())
    return 0


def _next_question() -> str | None:
    """The next line typed (line editing on a terminal), stripped; None to leave."""
    try:
        line = input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None
    line = line.strip()
    return None if line in LEAVE_WORDS else line
