"""Harmony's special tokens, defined once: their names and their ids in gpt-oss's vocabulary.

The renderer writes them, the parser reads them, the converter and the tiny fixtures put them in
vocabularies. A re-trained or tiny vocabulary keeps the names (the chat format and llama.cpp's
end-of-generation detection go by them), not necessarily the ids.
"""

from __future__ import annotations

STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN = "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>"
CHANNEL, START, END, MESSAGE, CALL = "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"

# gpt-oss's order: SPECIAL_TOKENS[i] has id FIRST_ID + i (o200k_harmony). The last is <|endofprompt|> in
# gpt-oss's tokenizer.json (openai-harmony calls it reserved).
FIRST_ID = 199998
SPECIAL_TOKENS = (
    STARTOFTEXT, ENDOFTEXT, "<|reserved_200000|>", "<|reserved_200001|>", RETURN, CONSTRAIN, "<|reserved_200004|>",
    CHANNEL, START, END, MESSAGE, "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", CALL,
    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
    "<|reserved_200017|>", "<|endofprompt|>",
)
IDS = {t: FIRST_ID + i for i, t in enumerate(SPECIAL_TOKENS)}

# What the renderer writes as control tokens (a model must have each of them).
CONTROL_TOKENS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
# What the parser reads as control tokens in generated output.
PARSED_TOKENS = (*CONTROL_TOKENS, ENDOFTEXT, STARTOFTEXT)
# Where generation stops (generation_config.json's eos_token_id; llama.cpp's end-of-generation tokens).
END_OF_GENERATION = (RETURN, ENDOFTEXT, CALL)
