"""How an example becomes the text whose activations are measured."""

from __future__ import annotations

from collections.abc import Mapping

from .targets import Render

def default_render(prompt: str, response: str | None) -> str:
    """The prompt, then a blank line and the response when there is one."""
    return prompt if response is None else f"{prompt}\n\n{response}"


def chat_render(tokenizer) -> Render:
    """Render examples with ``tokenizer``'s chat template (user turn, then the assistant's answer)."""

    def render(prompt: str, response: str | None) -> str:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)

    return render


def example_text(example: str | Mapping, render: Render = default_render) -> str:
    """The text of a plain string, a ``{"text"}`` record or a ``{"prompt", "response"?}`` record."""
    if isinstance(example, str):
        return example
    if isinstance(example.get("text"), str):
        return example["text"]
    if isinstance(example.get("prompt"), str):
        response = example.get("response")
        return render(example["prompt"], response if isinstance(response, str) else None)
    raise ValueError(f"an example needs 'text' or 'prompt', got keys {sorted(example)}")
