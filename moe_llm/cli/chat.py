"""`moe-llm chat MODEL_DIR`: an interactive, streamed, multi-turn terminal chat.

The whole history goes through the model's chat template each turn (oldest turns
are dropped when it outgrows the context). While a reply streams, Ctrl-C sets a
flag that the loop checks between tokens: the stream is closed at a token
boundary, so the engine is never interrupted mid-forward, and the session goes
on. A second Ctrl-C during the same reply interrupts at once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from rich.console import Console

from ..errors import InputError, MoeLLMError
from . import app
from .common import (
    AttnBitsOpt,
    BudgetOpt,
    CacheOpt,
    CpuExpertsOpt,
    DeviceOpt,
    ExpertsBitsOpt,
    ModelArg,
    NoPrefetchOpt,
    check_engine_options,
    load_engine,
    resolve_model,
)

HELP = """commands:
  /reset                 forget the conversation (keeps the system prompt)
  /stats                 cumulative engine statistics
  /set NAME VALUE        max_new_tokens, temperature, top_p, top_k or seed
  /help                  this text
  /exit, /quit, Ctrl-D   leave
Ctrl-C stops a reply; the conversation continues."""

_CONTROL = {c: None for c in (*range(0, 9), *range(11, 32), 127)}  # keep \\t and \\n
_SETTABLE = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}


class ReplyInterrupt:
    """SIGINT handler for the duration of one reply: first Ctrl-C asks to stop, second forces."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> ReplyInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


class ChatSession:
    def __init__(self, engine, console: Console, system: str | None, options: dict):
        self.engine = engine
        self.console = console
        self.system = system
        self.options = options
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _fit_history(self) -> None:
        """Drop the oldest exchanges until the prompt leaves room to answer."""
        trimmed = False
        while len(self.engine.encode(self.messages())) >= self.engine.context_length - 1:
            if len(self.history) <= 1:
                self.history.clear()
                raise InputError("the message is longer than the model's context")
            del self.history[:2]
            trimmed = True
        if trimmed:
            self.console.print("[dim](oldest turns dropped to fit the context)[/]")

    def reply(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        self._fit_history()
        before = self.engine.stats.copy()
        parts: list[str] = []
        last = None
        interrupted = False
        with ReplyInterrupt() as guard:
            stream = self.engine.stream(self.messages(), **self.options)
            try:
                for chunk in stream:
                    if guard.requested:
                        interrupted = True
                        break
                    parts.append(chunk.text)
                    self.console.out(chunk.text.translate(_CONTROL), end="", highlight=False)
                    self.console.file.flush()
                    last = chunk
            except KeyboardInterrupt:
                interrupted = True
            finally:
                stream.close()  # releases the engine now, not when garbage-collected
        self.history.append({"role": "assistant", "content": "".join(parts)})
        self.console.out("")
        if interrupted:
            self.console.print("[yellow]\\[interrupted][/]")
        self._status(self.engine.stats - before, last, interrupted)

    def _status(self, delta, last, interrupted: bool) -> None:
        reason = "interrupted" if interrupted else (last.finish_reason if last else "?")
        ttft = last.stats.get("time_to_first_token_s") if last is not None and last.stats else None
        line = (
            f"{delta.tokens_generated} tokens · {delta.tokens_per_second:.1f} tok/s · "
            f"cache hit {delta.hit_rate:.0%} · {delta.host_syncs_per_token:.1f} host syncs/token"
        )
        if ttft is not None:
            line += f" · first token {ttft * 1000:.0f} ms"
        self.console.print(f"[dim]{line} · {reason}[/]", highlight=False)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        from .generate import stats_table

        name, _, arg = line[1:].partition(" ")
        if name in ("exit", "quit"):
            return False
        if name == "reset":
            self.history.clear()
            self.console.print("[dim]history cleared[/]")
        elif name == "stats":
            stats = self.engine.stats_dict()
            stats["time_to_first_token_s"] = stats["prefill_seconds"] / max(1, stats["requests"])  # mean
            self.console.print(stats_table(stats))
        elif name == "help":
            self.console.print(HELP, highlight=False, markup=False)
        elif name == "set":
            self._set(arg.split())
        else:
            self.console.print(f"unknown command /{name} (try /help)", markup=False)
        return True

    def _set(self, args: list[str]) -> None:
        from ..config import GenerationConfig

        if len(args) != 2 or args[0] not in _SETTABLE:
            raise InputError(f"usage: /set NAME VALUE with NAME one of {', '.join(_SETTABLE)}")
        try:
            value = _SETTABLE[args[0]](args[1])
        except ValueError:
            raise InputError(f"{args[0]} must be a number, got {args[1]!r}") from None
        options = {**self.options, args[0]: value}
        GenerationConfig.build(**options)  # validate before adopting
        self.options = options
        self.console.print(f"[dim]{args[0]} = {value}[/]")

    def run(self) -> None:
        while True:
            try:
                line = self.console.input("[bold cyan]>>> [/]").strip()
            except EOFError:
                self.console.out("")
                return
            except KeyboardInterrupt:
                self.console.out("")
                self.console.print("[dim](Ctrl-D or /exit to leave)[/]")
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.reply(line)
            except MoeLLMError as exc:
                if self.history and self.history[-1]["role"] == "user":
                    self.history.pop()
                self.console.print(f"[red]error:[/] {exc}", highlight=False)


@app.command()
def chat(
    model_dir: Path = ModelArg,
    system: str = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(None, "--seed"),
    experts_bits: str = ExpertsBitsOpt,
    attn_bits: str = AttnBitsOpt,
    cache_per_layer: int = CacheOpt,
    gpu_budget: str = BudgetOpt,
    no_prefetch: bool = NoPrefetchOpt,
    cpu_experts: str = CpuExpertsOpt,
    device: str = DeviceOpt,
):
    """Chat with a model in the terminal: streamed replies, multi-turn history, /help for commands."""
    from ..config import GenerationConfig

    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    GenerationConfig.build(**options)  # refuse bad options before loading the model
    check_engine_options(device, experts_bits, attn_bits, cache_per_layer, gpu_budget, cpu_experts=cpu_experts)
    path, is_random = resolve_model(model_dir)
    console = Console(highlight=False)
    engine = load_engine(
        path, device, experts_bits, attn_bits, cache_per_layer, gpu_budget, not no_prefetch,
        **({"cpu_experts": cpu_experts} if cpu_experts else {}),
    )  # fmt: skip
    if is_random:
        console.print("[yellow]note:[/] the embedded tiny model has random weights: replies are noise")
    console.print(
        f"[bold]{engine.model_name}[/] · {engine.cache.num_slots} expert slots · "
        f"{engine.expert_bits_per_param:.2f} bits/param experts · /help for commands"
    )
    ChatSession(engine, console, system, options).run()
