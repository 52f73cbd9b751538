"""The one prompt template used for every domain (training data, evaluation prompts).

A document with segments (p1, a1), (p2, a2) is rendered as

    User: {p1}\\nAssistant: {a1}\\nUser: {p2}\\nAssistant: {a2}<EOS>

Only the answers and the EOS are trained on (loss mask 1); "User: ...\\nAssistant: " is the
prompt (loss mask 0). Plain-text documents (prompt None) are rendered as the raw text followed
by EOS, all trained on. EOS is appended by the tokenizing step (preprocess.encode_document),
not here, because it is a token id, not text.

Prompts that already carry this template (the ESFT prompt/answers files hold
"User: ...\\n\\nAssistant:") are unwrapped first so the template is applied exactly once.
"""

from __future__ import annotations

from typing import Sequence

from megatron_desmoe.data.formats import Segment

TEMPLATE_NAME = "user-assistant-v1"
USER_TAG = "User: "
ASSISTANT_TAG = "\nAssistant: "
TURN_SEPARATOR = "\n"

Piece = tuple[str, bool]  # (text, is_answer)


def strip_existing_template(prompt: str) -> str:
    """'User: X\\n\\nAssistant:' -> 'X'; any other prompt is returned unchanged."""
    stripped = prompt.strip()
    user, assistant = USER_TAG.strip(), ASSISTANT_TAG.strip()
    if stripped.startswith(user) and stripped.endswith(assistant):
        return stripped[len(user):-len(assistant)].strip()
    return prompt


def render_prompt(prompt: str) -> str:
    """The text a model is given to answer `prompt` (evaluation / generation)."""
    return f"{USER_TAG}{strip_existing_template(prompt)}{ASSISTANT_TAG}"


def render_pieces(segments: Sequence[Segment]) -> list[Piece]:
    """Text pieces of a document in order, each flagged as answer (trained on) or prompt."""
    pieces: list[Piece] = []
    for index, segment in enumerate(segments):
        if segment.prompt is None:
            pieces.append((segment.answer, True))
            continue
        separator = TURN_SEPARATOR if index else ""
        pieces.append((separator + render_prompt(segment.prompt), False))
        pieces.append((segment.answer, True))
    return pieces


def render_text(segments: Sequence[Segment]) -> str:
    """The whole document as text (without EOS): what tokenizer training sees."""
    return "".join(text for text, _ in render_pieces(segments))
