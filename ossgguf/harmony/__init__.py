"""gpt-oss's harmony chat format, as pure text (no llama.cpp): tokens, messages, rendering, parsing, tools.

- tokens.py: the special tokens, names and ids, defined once
- messages.py: OpenAI chat messages normalised, read from files; a parsed completion as a message
- render.py: messages -> the prompt the official template writes (text, or segments to tokenize)
- parse.py: generated tokens -> reasoning, content and tool calls, streaming
- tools.py: function tools as the template's TypeScript-like namespace; the built-in tools' texts
"""

# ruff: noqa: F401 - the package's public API
from .messages import (
    assistant_message,
    load_messages_and_tools,
    normalize_messages,
    normalize_tools,
    tool_call_problem,
)
from .parse import Event, HarmonyStreamParser, ParsedMessage, ToolCall, parse_completion, parse_tokens
from .render import (
    DEFAULT_REASONING,
    REASONING_EFFORTS,
    Segment,
    check_harmony_model,
    forced_call_start,
    markup_segments,
    render,
    render_from_files,
    render_segments,
)
from .tools import tool_namespace
