"""The `jaxgen` command line: generate, chat, score, convert, info.

    jaxgen generate "The three most important inventions in history are"
    jaxgen generate --input prompts.jsonl --output results.jsonl
    jaxgen chat --model MODEL_DIR
    jaxgen score notes.txt
    jaxgen convert --from gguf model.gguf -o MODEL_DIR
    jaxgen info

Every command runs on the default model (Gemma 3 270M, converted into the cache on first use)
unless `--model DIR` names a jaxgen model directory. Errors are reported as one line on stderr
with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict, deque
from typing import Callable, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence, TextIO, Tuple

EXIT_USAGE = 2
_ERRORS = (ValueError, TypeError, OSError, RuntimeError, NotImplementedError, LookupError)


class CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    from jaxgen import __version__

    parser = argparse.ArgumentParser(
        prog="jaxgen",
        description="jaxgen: run decoder-only language models with JAX (CTranslate2's Generator API). "
                    "Without --model, commands use the default model (Gemma 3 270M, converted into the "
                    "cache on first use).")
    parser.add_argument("--version", action="version", version=f"jaxgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # ------------------------------------------------------------------ generate
    p = sub.add_parser("generate", help="continue a prompt (streaming the text), or every prompt of a file",
                       description="Continue PROMPT and stream the generated text to stdout; or, with --input "
                                   "FILE, continue every prompt of FILE (one per line: .txt text, or .jsonl "
                                   "objects {\"prompt\": ..., \"id\": ..., \"max_length\": ..., and one of "
                                   "\"json_schema\" (a schema object), \"regex\" or \"choice\" (a list of strings) "
                                   "for that line's structured output}) in batches and "
                                   "write one JSON line per prompt, in input order (with \"complete\": false where a "
                                   "constrained output was cut by --max-length). Bad lines (not JSON, no prompt) "
                                   "are reported as FILE:LINE: ... on stderr and skipped; the exit status is "
                                   "then 1. Blank lines are skipped silently.")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the text to continue ('-' reads it from stdin, less one trailing newline); "
                        "not with --input")
    p.add_argument("--input", metavar="FILE", default=None,
                   help="continue every prompt of FILE ('-' reads stdin) instead of PROMPT")
    p.add_argument("--input-format", choices=("txt", "jsonl"), default=None,
                   help="txt: a prompt per line, as is; jsonl: a JSON object per line (default: jsonl for a "
                        ".jsonl file, else txt)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="with --input: where the JSON lines go (default and '-': stdout)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="with --input: prompts decoded together (default 32)")
    _add_progress_option(p)
    _add_model_options(p)
    _add_decoding_options(p)
    p.add_argument("--end-token", metavar="TOKEN", action="append", default=None,
                   help="also stop at this token of the model's vocabulary (repeatable; besides the EOS token); "
                        "\\n, \\t, \\r and \\\\ are read as escapes, so --end-token '\\n' stops at the token "
                        "'\\n'. A token is matched whole: where the tokenizer merges a newline into a longer "
                        "token (Gemma writes a blank line as the one token '\\n\\n'), name that token too, e.g. "
                        "--end-token '\\n' --end-token '\\n\\n'")
    p.add_argument("--stop", metavar="TEXT", action="append", default=None,
                   help="stop once the generated text contains TEXT (repeatable; the token that completes it is "
                        "the last one printed); escapes as for --end-token, e.g. --stop '\\nQ:'")
    p.add_argument("--beam-size", type=_positive_int, default=1,
                   help="beam search with this many beams (printed at the end, not streamed); default 1")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                       help="structured output: the generated text is one compact JSON value valid under this JSON "
                            "Schema (a file, or the schema's JSON text); needs jaxgen[constraints]")
    group.add_argument("--regex", metavar="PATTERN", default=None,
                       help="structured output: the generated text matches PATTERN whole (Rust regex syntax)")
    group.add_argument("--choice", metavar="TEXT", action="append", default=None,
                       help="structured output: the generated text is one of the --choice values (repeatable)")
    group.add_argument("--grammar", metavar="FILE", default=None,
                       help="structured output: the generated text follows the grammar of FILE (llguidance's Lark "
                            "syntax, or llama.cpp's GBNF)")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="a system prompt put before PROMPT (followed by a newline), cached as a static prompt")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before the continuation (default: yes)")
    p.set_defaults(func=cmd_generate)

    # ------------------------------------------------------------------ chat
    p = sub.add_parser("chat", help="interactive chat with an instruction-tuned model",
                       description="Chat with an instruction-tuned model: type a message and press Enter; "
                                   "'/exit' or end of input (Ctrl-D) quits, '/reset' starts over. Turns are "
                                   "written with the model directory's chat template (a model without one is an "
                                   "error) and a reply ends at the model's end-of-turn tokens (the token the "
                                   "template puts after a reply, generation_config.json's eos_token_id, EOS). "
                                   "--max-length counts the reply's tokens.")
    _add_model_options(p)
    _add_decoding_options(p, max_length=256)
    p.add_argument("--system", metavar="TEXT", default=None, help="a system prompt (cached as a static prompt)")
    p.set_defaults(func=cmd_chat)

    # ------------------------------------------------------------------ score
    p = sub.add_parser("score", help="log-likelihood and perplexity of each line of a file",
                       description="Score each non-empty line of FILE: number of scored tokens, "
                                   "log-likelihood (natural log) and perplexity, then the totals.")
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file ('-' reads stdin)")
    _add_model_options(p)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="lines scored together (default 8)")
    p.add_argument("--max-input-length", type=_positive_int, default=1024,
                   help="truncate longer lines to this many tokens (default 1024)")
    _add_progress_option(p)
    p.set_defaults(func=cmd_score)

    # ------------------------------------------------------------------ convert
    from jaxgen.convert_cli import add_convert_parser, run_convert

    p = add_convert_parser(sub)
    p.set_defaults(func=run_convert)

    # ------------------------------------------------------------------ info
    sub.add_parser("eval", add_help=False, help="lm-evaluation-harness's command line with the jaxgen backend "
                   "registered (jaxgen eval --model jaxgen --model_args model=DIR --tasks ...; needs jaxgen[eval])")
    p = sub.add_parser("info", help="describe a model directory",
                       description="Print a model's architecture, parameter count, size on disk, weight "
                                   "type, vocabulary size, special tokens, KV-cache size and attention "
                                   "implementation.")
    p.add_argument("model_path", metavar="MODEL", nargs="?", default=None,
                   help="a jaxgen model directory (default: the default model)")
    p.add_argument("--model", dest="model_option", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto",
                   help="the device whose compute type and attention are shown: cpu, cuda, tpu or auto (default)")
    p.add_argument("--compute-type", default="default",
                   help="the compute type whose KV-cache size is shown (default: the model's weight type)")
    p.set_defaults(func=cmd_info)
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="a jaxgen model directory (default: the default model, Gemma 3 270M)")
    p.add_argument("--device", default="auto", help="cpu, cuda, tpu or auto (default: auto)")
    p.add_argument("--compute-type", default="default",
                   help="default, auto, float32, float16, bfloat16, int8, int8_float32, int8_float16 or "
                        "int8_bfloat16 (default: the model's weight type)")


def _add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when stderr is a terminal)")


def _add_decoding_options(p: argparse.ArgumentParser, max_length: int = 64) -> None:
    p.add_argument("--max-length", type=_positive_int, default=max_length,
                   help=f"maximum number of new tokens, the prompt not counted (default {max_length}). "
                        f"Unlike the Python API's max_length, which with include_prompt_in_result=True (its "
                        f"default, as in CTranslate2) counts the prompt too")
    p.add_argument("--sampling-topk", type=_positive_int, default=1,
                   help="sample from the k most likely tokens; 1 is greedy decoding (default 1)")
    p.add_argument("--sampling-topp", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalty > 1 for tokens already produced (default 1: none)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="forbid repeating n-grams of this size (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ============================================================================ shared helpers
def _model_dir(path: Optional[str]) -> str:
    if path is None:
        from jaxgen.default_model import default_model_path

        return default_model_path()
    if not os.path.isdir(path):
        raise CLIError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{path!r} is not a jaxgen model directory (no config.json); "
                       f"convert a checkpoint with `jaxgen convert`")
    return path


def _load(args, need_tokenizer: bool = True):
    """(generator, tokenizer) for the parsed `--model/--device/--compute-type` options."""
    model_dir = _model_dir(args.model)
    tokenizer = None
    if need_tokenizer:
        from jaxgen.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    from jaxgen.generator import Generator

    generator = Generator(model_dir, device=args.device, compute_type=args.compute_type)
    return generator, tokenizer


def _sampling_kwargs(args) -> dict:
    return dict(max_length=args.max_length, sampling_topk=args.sampling_topk, sampling_topp=args.sampling_topp,
                sampling_temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, random_seed=args.seed)


def _read_text_arg(text: str) -> str:
    """PROMPT, or for '-' the text of stdin less one trailing newline (which `echo` and editors add,
    and which would change the continuation)."""
    if text != "-":
        return text
    text = sys.stdin.read()
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


def _stream(generator, tokenizer, prompt: List[str], kwargs: dict, end_ids: Sequence[int], out) -> str:
    """Streams the continuation of `prompt` to `out`; returns the generated text. With a constraint,
    a continuation that does not end with an end token was cut before the constraint was complete:
    a warning on stderr says so."""
    decoder = tokenizer.incremental_decoder(prompt)
    pieces = []
    stream = generator.generate_tokens(prompt, **kwargs)
    ended = False
    try:
        for step in stream:
            if step.is_last and step.token_id in end_ids:
                ended = True
                break
            piece = decoder.push(step.token_id)
            if piece:
                pieces.append(piece)
                out.write(piece)
                out.flush()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    rest = decoder.flush()
    if rest:
        pieces.append(rest)
        out.write(rest)
    out.flush()
    if kwargs.get("constraint") is not None and not ended:
        sys.stderr.write("jaxgen: warning: the output was cut (--max-length) before it completed the constraint\n")
    return "".join(pieces)


# ============================================================================ generate
def cmd_generate(args) -> int:
    """`jaxgen generate PROMPT` (streamed) or `jaxgen generate --input FILE` (every prompt of FILE)."""
    if (args.prompt is None) == (args.input is None):
        raise CLIError("give either PROMPT or --input FILE (exactly one of them)")
    if args.output is not None and args.input is None:
        raise CLIError("--output needs --input FILE")
    if args.system is not None and not args.system.strip():
        raise CLIError("the system prompt is empty")
    if args.input is not None:
        return _generate_file(args)
    text = _read_text_arg(args.prompt)
    if not text.strip():
        raise CLIError("the prompt is empty")
    generator, tokenizer = _load(args)
    kwargs = _generation_kwargs(args, generator, tokenizer)
    prompt = _prompt_tokens(tokenizer, text, kwargs.get("static_prompt"))
    if not prompt:
        raise CLIError("the prompt has no tokens")
    end_ids = _end_ids(generator, tokenizer, _end_token_args(args))
    out = sys.stdout
    if args.echo:
        out.write(text)
        out.flush()
    if args.beam_size > 1:
        results = generator.generate_batch([prompt], beam_size=args.beam_size, include_prompt_in_result=False,
                                           **kwargs)
        out.write(_continuation(tokenizer, prompt, results[0].sequences_ids[0], end_ids))
        if results[0].constraint_complete == [False]:
            sys.stderr.write("jaxgen: warning: the output was cut (--max-length) before it completed the constraint\n")
    else:
        _stream(generator, tokenizer, prompt, kwargs, end_ids, out)
    out.write("\n")
    out.flush()
    return 0


def _generation_kwargs(args, generator, tokenizer) -> dict:
    """Decoding options of `generate` for the Generator: sampling, end tokens, static prompt."""
    kwargs = _sampling_kwargs(args)
    extra = _end_token_args(args)
    if extra:
        missing = [t for t in extra if t not in generator.vocabulary]
        if missing:
            raise CLIError(f"--end-token {missing[0]!r} is not a token of this model's vocabulary")
        eos = [tokenizer.eos_token] if tokenizer.eos_token in generator.vocabulary else []
        kwargs["end_token"] = eos + extra
    if getattr(args, "stop", None):
        kwargs["stop_strings"] = _end_token_args(argparse.Namespace(end_token=args.stop))  # same escapes
    if args.system is not None:
        system = args.system if args.system[-1:].isspace() else args.system + "\n"
        kwargs["static_prompt"] = tokenizer.encode(system, add_special_tokens=True)
    constraint = _constraint_arg(args)
    if constraint is not None:
        kwargs["constraint"] = constraint
    return kwargs


def _constraint_arg(args):
    """The constraint of --json-schema / --regex / --choice / --grammar (None without one)."""
    from jaxgen import constraints

    if getattr(args, "json_schema", None) is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "[")) and text.strip() not in ("true", "false"):
            text = _read_file_arg(text, "--json-schema")
        try:
            return constraints.JsonSchema(text)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--json-schema: {exc}") from None
    if getattr(args, "regex", None) is not None:
        return constraints.Regex(args.regex)
    if getattr(args, "choice", None):
        try:
            return constraints.Choice(args.choice)
        except ValueError as exc:
            raise CLIError(f"--choice: {exc}") from None
    if getattr(args, "grammar", None) is not None:
        try:
            return constraints.Grammar(_read_file_arg(args.grammar, "--grammar"))
        except ValueError as exc:
            raise CLIError(f"--grammar: {exc}") from None
    return None


def _read_file_arg(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise CLIError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None


def _line_constraint(obj: dict):
    """The constraint of a JSONL line ("json_schema", "regex" or "choice"; None without one)."""
    from jaxgen import constraints

    given = [k for k in ("json_schema", "regex", "choice") if k in obj]
    if not given:
        return None
    if len(given) > 1:
        raise _BadLine(f"give at most one of \"json_schema\", \"regex\", \"choice\" (got {', '.join(given)})")
    key, value = given[0], obj[given[0]]
    try:
        if key == "json_schema":
            return constraints.JsonSchema(value)
        if key == "regex":
            if not isinstance(value, str):
                raise TypeError(f"must be a string, got {type(value).__name__}")
            return constraints.Regex(value)
        return constraints.Choice(value)
    except (TypeError, ValueError) as exc:
        raise _BadLine(f'"{key}": {exc}') from None


def _prompt_tokens(tokenizer, text: str, static_prompt: Optional[List[str]]) -> List[str]:
    """The prompt's tokens; they start with BOS (when the model adds one) unless a static prompt does."""
    return tokenizer.encode(text, add_special_tokens=static_prompt is None)


def _end_token_args(args) -> List[str]:
    r"""The `--end-token` values with the escapes \n, \t, \r and \\ read."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}

    def unescape(text: str) -> str:
        out, i = [], 0
        while i < len(text):
            if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
                out.append(escapes[text[i + 1]])
                i += 2
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    return [unescape(t) for t in args.end_token or ()]


def _continuation(tokenizer, prompt: List[str], ids: Sequence[int], end_ids: Sequence[int]) -> str:
    """The text of generated `ids` (end tokens dropped), decoded after the prompt's last tokens so
    that its first word's leading space comes out as when streamed."""
    context = tokenizer.convert_tokens_to_ids(prompt[-4:])
    ids = [i for i in ids if i not in end_ids]
    return tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]


def _end_ids(generator, tokenizer, extra: Sequence[str] = ()) -> List[int]:
    """Ids of the EOS token and of `extra` tokens that are in the model's vocabulary."""
    ids = []
    for token in [tokenizer.eos_token, *extra]:
        if token is not None and token in generator.vocabulary:
            ids.append(generator.vocabulary.id_of(token))
    return ids


# ---------------------------------------------------------------------------- generate --input
class _Prompt(NamedTuple):
    """One good input line: the start of its output record, its tokens, its own max_length."""
    record: dict  # {"line": N, "id": ... (when given), "prompt": text}
    tokens: List[str]
    max_length: Optional[int]
    constraint: object = None  # the line's own constraint (jaxgen.constraints), else None


class _BadLine(ValueError):
    """An input line that is skipped (reported on stderr with its line number)."""


def _generate_file(args) -> int:
    """Generates from every prompt of `--input`, writing JSON lines in input order; status 1 when a
    line was bad, 0 otherwise."""
    fmt = args.input_format or ("jsonl" if args.input.lower().endswith(".jsonl") else "txt")
    name = "<stdin>" if args.input == "-" else args.input
    total = None if args.input == "-" else sum(1 for line in _lines(args.input) if line.strip())
    if total == 0:
        raise CLIError(f"{args.input} has no prompts")
    generator, tokenizer = _load(args)
    kwargs = _generation_kwargs(args, generator, tokenizer)
    end_ids = _end_ids(generator, tokenizer, _end_token_args(args))
    bad = 0
    with _open_output(args.output) as out, _progress_bar(total, " prompts", "Generating", args.progress) as bar:
        def report(line: int, message: str) -> None:
            nonlocal bad
            bad += 1
            bar.write(f"{name}:{line}: {message}", file=sys.stderr)
            if bar.total:
                bar.total -= 1
                bar.refresh()

        prompts = _read_prompts(args.input, fmt, tokenizer, kwargs.get("static_prompt"), report,
                                generator.prepare_constraint)
        start, generated, done = time.monotonic(), 0, 0
        slots_before = generator.scheduler_stats
        per_line = fmt == "jsonl" and (args.input == "-" or _mentions_constraints(args.input))
        for prompt, result in _generate_in_order(generator, prompts, args, kwargs, per_line):
            ids = result.sequences_ids[0]
            record = dict(prompt.record, text=_continuation(tokenizer, prompt.tokens, ids, end_ids), tokens=len(ids))
            if result.constraint_complete:
                record["complete"] = result.constraint_complete[0]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done, generated = done + 1, generated + len(ids)
            bar.set_postfix_str(f"{generated / max(time.monotonic() - start, 1e-6):.1f} tokens/s"
                                f"{_slot_use(slots_before, generator.scheduler_stats)}", refresh=False)
            bar.update(1)
    if done == 0 and bad == 0:
        raise CLIError(f"{args.input} has no prompts")
    return 1 if bad else 0


def _slot_use(before: dict, now: dict) -> str:
    """", slots 83%": the scheduler's slot utilisation (generated tokens / slot-steps) since
    `before`; "" when no slot ran (static sub-batches)."""
    slot_steps = now["slot_steps"] - before["slot_steps"]
    return f", slots {(now['tokens'] - before['tokens']) / slot_steps:.0%}" if slot_steps else ""


def _generate_in_order(generator, prompts: Iterator[_Prompt], args, kwargs: dict,
                       per_line: bool = False) -> Iterator[Tuple[_Prompt, object]]:
    """(prompt, GenerationResult) in input order, through `generate_iterable`: one stream per
    max_length (lines with their own "max_length" are batched with the lines that share it).
    per_line: lines may carry their own constraints."""
    split = _SplitByKey((p.max_length or args.max_length, p) for p in prompts)
    streams: Dict[int, Iterator] = {}
    while split.pending or split.read():
        max_length, prompt = split.pending.popleft()
        if max_length not in streams:
            options = dict(kwargs, max_length=max_length)
            items = split.items(max_length)
            if per_line:  # each line's constraint (else the command's), read alongside its tokens
                read: deque = deque()
                default = kwargs.get("constraint")
                tokens = _tokens_noting(items, read, default)
                options["constraint"] = _popping(read)
            else:
                tokens = (p.tokens for p in items)
            streams[max_length] = generator.generate_iterable(
                tokens, max_batch_size=args.batch_size, beam_size=args.beam_size, include_prompt_in_result=False,
                **options)
        yield prompt, next(streams[max_length])


def _mentions_constraints(path: str) -> bool:
    """Whether a prompt file may hold per-line constraints (a cheap scan for their keys)."""
    return any('"json_schema"' in line or '"regex"' in line or '"choice"' in line for line in _lines(path))


def _tokens_noting(items: Iterator[_Prompt], read: deque, default) -> Iterator[List[str]]:
    for p in items:
        read.append(p.constraint if p.constraint is not None else default)
        yield p.tokens


def _popping(read: deque) -> Iterator:
    while True:
        yield read.popleft() if read else None


class _SplitByKey:
    """Splits one lazily read stream of (key, item) pairs into one iterator per key. The source is
    read only when an iterator needs its next item; items of other keys wait in their buffers, and
    `pending` holds every pair read so far, in source order, until the caller takes it."""

    def __init__(self, source: Iterator[Tuple[Hashable, object]]):
        self._source = iter(source)
        self._buffers: Dict[Hashable, deque] = defaultdict(deque)
        self.pending: deque = deque()
        self._exhausted = False

    def read(self) -> bool:
        """Reads one pair from the source; False when it has none left."""
        if not self._exhausted:
            for key, item in self._source:
                self._buffers[key].append(item)
                self.pending.append((key, item))
                return True
            self._exhausted = True
        return False

    def items(self, key: Hashable) -> Iterator:
        """The items of `key`, in source order."""
        buffer = self._buffers[key]
        while buffer or self.read():
            if buffer:
                yield buffer.popleft()


def _read_prompts(path: str, fmt: str, tokenizer, static_prompt: Optional[List[str]],
                  report: Callable[[int, str], None], check_constraint: Callable = lambda c: None) -> Iterator[_Prompt]:
    """The good lines of a prompt file, lazily; blank lines are skipped, bad ones go to `report`
    (a line's constraint is bad when `check_constraint` raises ValueError or TypeError)."""
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            fields = _parse_jsonl_line(line) if fmt == "jsonl" else {"prompt": line}
            tokens = _prompt_tokens(tokenizer, fields["prompt"], static_prompt)
            if not tokens:
                raise _BadLine("the prompt has no tokens")
            if fields.get("constraint") is not None:
                try:
                    check_constraint(fields["constraint"])
                except (TypeError, ValueError) as exc:
                    raise _BadLine(str(exc)) from None
        except _BadLine as exc:
            report(n, str(exc))
            continue
        max_length = fields.pop("max_length", None)
        constraint = fields.pop("constraint", None)
        yield _Prompt({"line": n, **fields}, tokens, max_length, constraint)


def _parse_jsonl_line(line: str) -> dict:
    """{"id": ... (when given), "prompt": str, "max_length": int (when given)} from a JSON line."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise _BadLine(f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise _BadLine('no "prompt" string' if prompt is None else '"prompt" is not a string')
    if not prompt.strip():
        raise _BadLine('"prompt" is empty')
    fields = {"id": obj["id"]} if "id" in obj else {}
    fields["prompt"] = prompt
    if "max_length" in obj:
        max_length = obj["max_length"]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise _BadLine(f'"max_length" must be a positive integer, got {json.dumps(max_length)}')
        fields["max_length"] = max_length
    constraint = _line_constraint(obj)
    if constraint is not None:
        fields["constraint"] = constraint
    return fields


def _lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file ('-': stdin), without their line ends; unreadable input is a CLIError."""
    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        for line in f:
            yield line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not a UTF-8 text file") from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        if f is not sys.stdin:
            f.close()


class _open_output:
    """`with _open_output(path) as out`: the file at `path` (UTF-8), or stdout for None and '-'."""

    def __init__(self, path: Optional[str]):
        self._path = None if path in (None, "-") else path
        self._file: Optional[TextIO] = None

    def __enter__(self) -> TextIO:
        if self._path is None:
            return sys.stdout
        try:
            self._file = open(self._path, "w", encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write {self._path}: {exc.strerror or exc}") from None
        return self._file

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()


def _progress_bar(total: Optional[int], unit: str, desc: str, show: Optional[bool]):
    """A tqdm bar on stderr, shown when `show` is True, or when it is None and stderr is a terminal:
    'done/total [elapsed<ETA, N units/s, postfix]', or 'done [elapsed, N units/s, postfix]' when
    the total is unknown. Rates are averages since the start."""
    from tqdm import tqdm

    rate = "{rate_noinv_fmt}{postfix}]"
    if total is None:
        bar_format = "{desc}: {n_fmt} [{elapsed}, " + rate
    else:
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, " + rate
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, bar_format=bar_format, smoothing=0,
                disable=not (sys.stderr.isatty() if show is None else show))


# ============================================================================ chat
def cmd_chat(args) -> int:
    """Turns rendered with the model directory's chat template; a reply ends at one of the model's
    end-of-turn tokens (`Tokenizer.end_of_turn_tokens`: the template's, generation_config.json's, EOS)."""
    from jaxgen.tokenizer import find_chat_template, load_tokenizer

    model_dir = _model_dir(args.model)
    if not find_chat_template(model_dir):
        raise CLIError(f"the model in {model_dir} has no chat template (no chat_template.jinja, and no chat_template "
                       f"in tokenizer_config.json or chat_template.json), so it is probably a base model, not "
                       f"instruction-tuned; `jaxgen chat` needs one (the default model is a base model: use "
                       f"`jaxgen generate`)")
    tokenizer = load_tokenizer(model_dir)
    end_tokens = tokenizer.end_of_turn_tokens()
    if not end_tokens:
        raise CLIError(f"the model in {model_dir} has no end-of-turn token in its vocabulary (none after an "
                       f"assistant message in the chat template, no eos_token_id, no EOS token)")
    from jaxgen.generator import Generator

    generator = Generator(model_dir, device=args.device, compute_type=args.compute_type)
    interactive = sys.stdin.isatty()
    end_ids = [generator.vocabulary.id_of(t) for t in end_tokens]
    base = [{"role": "system", "content": args.system}] if args.system else []
    prefix = _static_chat_prefix(tokenizer, base)
    kwargs = _sampling_kwargs(args)
    kwargs["end_token"] = end_tokens
    messages = list(base)
    if interactive:
        print("Type a message and press Enter; /exit or Ctrl-D quits, /reset starts over.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        user = line.strip()
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            messages = list(base)
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        tokens = tokenizer.encode(tokenizer.apply_chat_template(messages), parse_special=True)
        call = dict(kwargs)
        if prefix and len(tokens) > len(prefix) and tokens[:len(prefix)] == prefix:
            call["static_prompt"] = prefix
            tokens = tokens[len(prefix):]
        reply = _stream(generator, tokenizer, tokens, call, end_ids, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def _static_chat_prefix(tokenizer, base: List[dict]) -> List[str]:
    """Tokens every conversation starts with (BOS, system prompt, first turn header): the common
    prefix of two renderings that differ only in the user's message. Cached as a static prompt."""
    probes = [tokenizer.encode(tokenizer.apply_chat_template(base + [{"role": "user", "content": c}]),
                               parse_special=True) for c in ("A", "Z")]
    n = 0
    while n < min(map(len, probes)) and probes[0][n] == probes[1][n]:
        n += 1
    return probes[0][:max(n - 1, 0)]  # the last common token may merge with the user's text


# ============================================================================ score
def cmd_score(args) -> int:
    lines = [(n, line) for n, line in enumerate(_lines(args.file), 1) if line.strip()]
    if not lines:
        raise CLIError(f"{args.file} has no text to score")
    generator, tokenizer = _load(args)
    encoded = [(n, line, tokenizer.encode(line, add_special_tokens=True)) for n, line in lines]
    out = sys.stdout
    out.write("line\ttokens\tlog_likelihood\tperplexity\n")
    total_lp, total_n = 0.0, 0
    results = {}
    with _progress_bar(len(encoded), " lines", "Scoring", args.progress) as bar:
        for start in range(0, len(encoded), args.batch_size):
            chunk = encoded[start:start + args.batch_size]
            scores = generator.score_batch([tokens for _, _, tokens in chunk], max_input_length=args.max_input_length)
            for (n, _, _), score in zip(chunk, scores):
                results[n] = score.log_probs
            bar.update(len(chunk))
    for n, _, _ in encoded:
        log_probs = results[n]
        if not log_probs:
            out.write(f"{n}\t0\tnan\tnan\n")
            continue
        lp = float(sum(log_probs))
        total_lp += lp
        total_n += len(log_probs)
        out.write(f"{n}\t{len(log_probs)}\t{lp:.4f}\t{_ppl(lp, len(log_probs)):.4f}\n")
    if total_n == 0:
        raise CLIError("no line has enough tokens to score (at least 2 are needed)")
    out.write(f"total\t{total_n}\t{total_lp:.4f}\t{_ppl(total_lp, total_n):.4f}\n")
    print(f"perplexity: {_ppl(total_lp, total_n):.4f} over {total_n} tokens in {len(encoded)} lines",
          file=sys.stderr)
    return 0


def _ppl(log_likelihood: float, n: int) -> float:
    try:
        return math.exp(-log_likelihood / n)
    except OverflowError:
        return math.inf


# ============================================================================ info
def cmd_info(args) -> int:
    from jaxgen.model import cpu_kernels
    from jaxgen.model.checkpoint import active_parameter_count, parameter_count
    from jaxgen.model.config import ModelConfig
    from jaxgen.tokenizer import find_chat_template

    model_dir = _model_dir(args.model_path or args.model_option)
    config = ModelConfig.load(model_dir)
    params, active = parameter_count(config), active_parameter_count(config)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(model_dir) for f in files)
    tokenizer_file = next((f for f in ("tokenizer.model", "tokenizer.json")
                           if os.path.isfile(os.path.join(model_dir, f))), None)
    sliding = sum(t == "sliding" for t in config.layer_types)
    rows = [
        ("model", os.path.abspath(model_dir)),
        ("architecture", config.architecture),
        ("parameters", f"{params:,} ({_human(params, 1000, ['', 'K', 'M', 'B', 'T'])})"
                       + (f", {active:,} active per token ({config.experts_per_token} of {config.num_experts} "
                          f"experts)" if active != params else "")),
        ("size on disk", _human(size, 1024, [" B", " KiB", " MiB", " GiB", " TiB"])),
        ("weight dtype", config.weight_dtype),
        ("vocabulary size", f"{config.vocab_size:,}"),
        ("layers", f"{config.num_layers}" + (f" ({sliding} sliding-window, window {config.sliding_window})"
                                             if sliding else "")),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", f"{config.num_heads} query, {config.num_kv_heads} key/value, head_dim {config.head_dim}"
                            + (f" (full layers: {config.full_kv_heads or config.num_kv_heads} key/value, head_dim "
                               f"{config.full_head_dim or config.head_dim})"
                               if config.full_head_dim or config.full_kv_heads else "")),
        ("context length", f"{config.max_position_embeddings:,}"),
        ("special tokens", ", ".join(f"{k}={v!r}" for k, v in (
            ("bos", config.bos_token), ("eos", config.eos_token), ("unk", config.unk_token),
            ("pad", config.pad_token)) if v is not None) or "none"),
        ("adds BOS", "yes" if config.add_bos_token else "no"),
        ("tokenizer", tokenizer_file or "none"),
        ("chat template", "yes" if find_chat_template(model_dir) else "no (base model?)"),
        *_memory_rows(config, args.device, args.compute_type),
        *cpu_kernels.info_rows(config, args.device, args.compute_type),  # measured per CPU (issue 18)
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _memory_rows(config, device: str, compute_type: str) -> List[tuple]:
    """Compute type, KV-cache sizes (weight dtype and compute type) and attention, for `info`."""
    from jaxgen.runtime import memory
    from jaxgen.runtime.devices import resolve_devices
    from jaxgen.model.loading import resolve_compute_type

    platform, _ = resolve_devices(device, 0)
    ctype = resolve_compute_type(compute_type, config.weight_dtype, platform)
    dtypes = {ctype.activations: "compute type"}
    if config.weight_dtype != "int8":  # an int8 model's cache is in its float compute type
        dtypes[config.weight_dtype] = ("weight dtype and compute type" if config.weight_dtype in dtypes
                                       else "weight dtype")

    def sizes(per, unit: str) -> str:  # "128 B per token in float32 (compute type), 64 B in bfloat16 (...)"
        return ", ".join(f"{memory.format_bytes(per(config, d))}{unit if i == 0 else ''} in {d} ({label})"
                         for i, (d, label) in enumerate(dtypes.items()))

    full = sum(t != "sliding" for t in config.layer_types)
    sliding = len(config.layer_types) - full
    rows = [("compute type", f"{ctype.name} on {platform}"),
            ("KV cache", f"{sizes(memory.kv_cache_bytes_per_token, ' per token')}; "
                         f"{full} full-attention layer{'s' * (full != 1)}")]
    if sliding:
        rows.append(("sliding cache", f"{sizes(memory.sliding_cache_bytes_per_sequence, ' per sequence')}; "
                                      f"{sliding} sliding layer{'s' * (sliding != 1)}, ring of "
                                      f"{config.sliding_window:,} slots"))
    from jaxgen.model.attention import describe_attention

    rows.append(("attention", describe_attention(config, platform, dtype=ctype.dtype)))
    return rows


def _human(value: float, base: int, units: List[str]) -> str:
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.1f}{unit}" if unit.strip() else f"{value:.0f}{unit}"
        value /= base
    return f"{value:.1f}{units[-1]}"


# ============================================================================ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the `jaxgen` command; returns (and, as a console script, exits with) its status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # lm-eval's own flags, passed on untouched (jaxgen.eval_cli)
        from jaxgen.eval_cli import run_eval

        return run_eval(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxgen.runtime.compilation_cache import enable_compilation_cache

    enable_compilation_cache()  # <cache dir>/xla unless JAXGEN_COMPILATION_CACHE=0 or JAX has its own
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # stdout was closed (e.g. `jaxgen generate ... | head`): quit quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except CLIError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except _ERRORS as exc:
        _error(str(exc) or type(exc).__name__)
        return EXIT_USAGE
    return int(status or 0)


def _error(message: str) -> None:
    message = " ".join(message.split())  # one line
    print(f"jaxgen: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
