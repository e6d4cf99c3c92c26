"""The chat and tool-call format the policy speaks (Qwen / Hermes style, as rStar2-Agent).

A trajectory, as text::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n
    <|im_start|>user\\n{problem}<|im_end|>\\n
    <|im_start|>assistant\\n{reasoning}<tool_call>\\n{"name": "python", "arguments": {"code": "..."}}\\n</tool_call>
    <|im_end|>\\n<|im_start|>user\\n<tool_response>\\n{tool output}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n
    ... <answer>... \\boxed{N}</answer><|im_end|>

The generator stops the model at ``</tool_call>``, runs the code, and appends the token
ids of :func:`tool_response_suffix` (loss-masked) before continuing. ``CHAT_TEMPLATE``
renders the same bytes from a message list, so a logged trajectory can be re-rendered
from its messages and compared token for token.
"""

from __future__ import annotations

import json
import re

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"

#: Tokens a tokenizer built by reckon registers as single added tokens.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
ADDED_TOKENS = [TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END, ANSWER_START, ANSWER_END]

TOOL_NAME = "python"

SYSTEM_PROMPT = "Solve it. Python runs in <tool_call>. Put the final integer in <answer> tags."

# Roles: system, user, assistant (content may contain tool calls), tool (a tool response).
# No whitespace control: the string has no stray whitespace, and every "\n" is part of the format.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ToolCallParseError(ValueError):
    """The model's tool call is not the JSON the format asks for; the text says why."""


def tool_call_text(code: str) -> str:
    """The exact text of one python tool call, as demonstrations write it."""
    return f"{TOOL_CALL_START}\n{json.dumps({'name': TOOL_NAME, 'arguments': {'code': code}})}\n{TOOL_CALL_END}"


_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)


def parse_tool_call(turn_text: str) -> str:
    """The python code of the last tool call in one assistant turn.

    Raises ToolCallParseError naming the problem (no call, bad JSON, wrong tool name,
    missing code): the generator returns that message to the model as the tool response.
    """
    calls = _CALL_RE.findall(turn_text)
    if not calls:
        raise ToolCallParseError("no <tool_call>...</tool_call> block found")
    body = calls[-1].strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"tool call is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(call, dict):
        raise ToolCallParseError("tool call must be a JSON object with 'name' and 'arguments'")
    if call.get("name") != TOOL_NAME:
        raise ToolCallParseError(f"unknown tool {call.get('name')!r}; the only tool is {TOOL_NAME!r}")
    args = call.get("arguments")
    if isinstance(args, str):  # some models emit arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallParseError("'arguments' is a string that is not JSON") from None
    if not isinstance(args, dict) or not isinstance(args.get("code"), str):
        raise ToolCallParseError("'arguments' must be an object with a string 'code'")
    return args["code"]


def tool_response_suffix(text: str) -> str:
    """Text appended after a model turn that ended with ``</tool_call>`` (loss-masked)."""
    return f"{IM_END}\n{IM_START}user\n{TOOL_RESPONSE_START}\n{text}\n{TOOL_RESPONSE_END}{IM_END}\n{IM_START}assistant\n"


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added: ``tokenizer.encode(text, add_special_tokens=False)``.

    Why not that call itself: for a fast tokenizer transformers runs it as a batch of one
    (``encode_batch``), which releases the GIL and hands the text to the tokenizers thread
    pool. Next to a busy engine thread one tool response then cost ~270 µs of the event
    loop's thread instead of ~20 µs (bench.generator, 1000 calls per round). The backend
    tokenizer's own ``encode`` does the same tokenization in the calling thread; a slow
    (pure Python) tokenizer has no backend and takes the plain call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=False)
    return backend.encode(text, add_special_tokens=False).ids


def prompt_messages(problem: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The message list that opens every rollout for ``problem``."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": problem})
    return msgs


def split_turns(response_text: str) -> list[dict]:
    """Split a logged response (model text with tool responses inlined) into messages.

    Inverse of the generator's concatenation: returns assistant/tool messages in order.
    """
    msgs: list[dict] = []
    rest = response_text
    sep_open = f"{IM_END}\n{IM_START}user\n{TOOL_RESPONSE_START}\n"
    sep_close = f"\n{TOOL_RESPONSE_END}{IM_END}\n{IM_START}assistant\n"
    while True:
        i = rest.find(sep_open)
        if i < 0:
            final = rest[: -len(IM_END)] if rest.endswith(IM_END) else rest
            msgs.append({"role": "assistant", "content": final})
            return msgs
        msgs.append({"role": "assistant", "content": rest[:i]})
        rest = rest[i + len(sep_open) :]
        j = rest.find(sep_close)
        if j < 0:  # truncated inside a tool response
            msgs.append({"role": "tool", "content": rest})
            return msgs
        msgs.append({"role": "tool", "content": rest[:j]})
        rest = rest[j + len(sep_close) :]


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` rendered by CHAT_TEMPLATE, and a loss mask.

    The mask is 1 on what the policy itself writes (assistant content, and the
    ``<|im_end|>`` closing a final assistant turn), 0 on system/user/tool text and on the
    template's own framing. Segments are tokenized separately at special-token
    boundaries, exactly as the generator builds a trajectory, so the ids equal
    ``tokenizer.apply_chat_template(messages)`` for tokenizers whose framing tokens are
    added tokens.
    """
    ids: list[int] = []
    mask: list[int] = []

    def put(text: str, m: int) -> None:
        if text:
            t = encode_text(tokenizer, text)
            ids.extend(t)
            mask.extend([m] * len(t))

    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "tool":
            put(f"{IM_START}user\n{TOOL_RESPONSE_START}\n{content}\n{TOOL_RESPONSE_END}{IM_END}\n", 0)
        elif role == "assistant":
            put(f"{IM_START}assistant\n", 0)
            put(content, 1)
            # A turn ending in a tool call is cut by the stop string; its <|im_end|> is framing.
            put(IM_END, 0 if content.rstrip().endswith(TOOL_CALL_END) else 1)
            put("\n", 0)
        else:
            put(f"{IM_START}{role}\n{content}{IM_END}\n", 0)
    return ids, mask


def encode_prompt(tokenizer, problem: str, system: str | None = SYSTEM_PROMPT) -> list[int]:
    """Token ids that open a rollout for ``problem``: the prompt messages, then the
    assistant header the model continues from."""
    ids, _ = encode_messages(tokenizer, prompt_messages(problem, system))
    return ids + encode_text(tokenizer, f"{IM_START}assistant\n")
