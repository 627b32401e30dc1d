"""Definitions that several scripts share, written once so that they cannot drift apart.

Keep this module small: a piece belongs here only when two scripts need the very same thing.
"""


def prompt_prefix(instruction: str | None) -> str:
    """The string prepended to a text: the recipe embeds f"{instruction} {text}" (exactly one space),
    and the raw text when the instruction is empty. sentence-transformers prompts, `BiEncoder.encode`'s
    `prompt`, the miner and the evaluation all prepend this same string."""
    return f"{instruction} " if instruction else ""


def with_prompt(instruction: str | None, text: str) -> str:
    """The text as the model reads it: prompt_prefix(instruction) + text."""
    return prompt_prefix(instruction) + text
