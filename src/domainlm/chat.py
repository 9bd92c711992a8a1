"""The chat template and the pieces of a rendered conversation: shared by fine-tuning (finetune/data.py: which
tokens are trained) and downstream scoring (evaluate/tasks.py: the prompt a fine-tuned model answers)."""

from __future__ import annotations

from domainlm.errors import UserError

# Plain-text role headers, so no new tokens (and no resized embeddings) are needed for a from-scratch
# tokenizer; the assistant turn ends with the EOS token that separated documents in pretraining.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' }}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' }}{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def ensure_chat_template(tok) -> bool:
    """Give the tokenizer our template unless it already has one; True if it was added."""
    if getattr(tok, "chat_template", None):
        return False
    if tok.eos_token is None:
        raise UserError(f"{tok.name_or_path}: the tokenizer has no eos_token; the chat template ends turns with it")
    tok.chat_template = CHAT_TEMPLATE
    return True


def segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; their concatenation is the template's rendering."""

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise UserError(f"{tok.name_or_path}: its chat template does not render a conversation as a prefix of "
                            "the longer one; cannot tell the prompt from the response to mask the loss")
        out += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    rest = render(messages, False)[len(done):]
    if rest:
        out.append((rest, False))
    return [(t, trained) for t, trained in out if t]


def pad_id_of(tok) -> int:
    for x in (tok.pad_token_id, tok.eos_token_id, 0):
        if x is not None:
            return int(x)
    return 0
