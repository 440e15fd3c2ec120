"""Conversation templates: fschat's (Vicuna, Llama-2-chat) or the tokenizer's own chat template.

A template turns a multi-turn conversation into the prompt token ids and knows when an answer ends
(stop token ids and stop strings), exactly as FastChat / Spec-Bench build MT-Bench prompts.

Two model-config options make a prompt byte-identical to the published runs:
- `system_message`: a literal system prompt, or the name of one in SYSTEM_PROMPTS (`llama-2-default`: the
  default Llama-2-chat system prompt that EAGLE's Llama-2-chat evaluation sets); null keeps the
  template's own (fschat's llama-2: empty).
- `prompt_suffix`: text appended to every generation prompt (EAGLE's Llama-2-chat runs append one space
  after `[/INST]`: `conv.get_prompt() + " "`); "" by default. Training text never carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from harness.infra.errors import HarnessError

# named system prompts a model config may ask for; EAGLE's gen_ea_answer_llama2chat.py sets this one
# (two spaces after "while being safe.", as the original Llama-2 prompt has)
SYSTEM_PROMPTS = {
    "llama-2-default": (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
        "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
        "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
        "does not make any sense, or is not factually coherent, explain why instead of answering something not "
        "correct. If you don't know the answer to a question, please don't share false information."),
}


@dataclass
class ChatTemplate:
    name: str
    tokenizer: object
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    system_message: str | None = None
    prompt_suffix: str = ""        # appended to every generation prompt (EAGLE's Llama-2-chat: " ")

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        """`turns` = [(user, assistant or None)]; the last assistant is None (to be generated)."""
        raise NotImplementedError

    def encode(self, turns: list[tuple[str, str | None]]) -> list[int]:
        raise NotImplementedError

    # whether `encode` lets the tokenizer add its special tokens (BOS); training tokenises the same way
    add_special_tokens = True

    def conversation_text(self, turns: list[tuple[str, str]]) -> str:
        """The whole conversation with every answer written and closed (the text training tokenises)."""
        raise NotImplementedError

    def clean_answer(self, text: str) -> str:
        """Answer text as it goes back into the next turn's prompt: cut at a stop string, stripped."""
        for stop in self.stop_strings:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()

    def turn_prompt(self, users: list[str], answers: list[str]) -> list[int]:
        """Prompt ids of turn len(answers) of a multi-turn question: earlier turns carry the given
        answers (decoded text, cleaned as above) - FastChat / Spec-Bench's multi-turn protocol."""
        history = [(user, self.clean_answer(answer)) for user, answer in zip(users, answers)]
        return self.encode(history + [(users[len(answers)], None)])


class HFChatTemplate(ChatTemplate):
    """The tokenizer's own `chat_template` (SmolLM2)."""

    def _messages(self, turns):
        messages = [{"role": "system", "content": self.system_message}] if self.system_message else []
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        return messages

    def prompt_text(self, turns):
        return self.tokenizer.apply_chat_template(self._messages(turns), tokenize=False,
                                                  add_generation_prompt=True) + self.prompt_suffix

    def encode(self, turns):
        # the template already writes every special token it wants; add none
        return self.tokenizer(self.prompt_text(turns), add_special_tokens=False).input_ids

    add_special_tokens = False

    def conversation_text(self, turns):
        return self.tokenizer.apply_chat_template(self._messages(turns), tokenize=False,
                                                  add_generation_prompt=False)


class FastChatTemplate(ChatTemplate):
    """fschat's `get_conv_template(name)`: `vicuna_v1.1`, `llama-2`, ..."""

    def _conversation(self, turns):
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(self.name)
        if self.system_message is not None:
            conv.set_system_message(self.system_message)
        for user, assistant in turns:
            conv.append_message(conv.roles[0], user)
            conv.append_message(conv.roles[1], assistant)
        return conv

    def prompt_text(self, turns):
        return self._conversation(turns).get_prompt() + self.prompt_suffix

    def encode(self, turns):
        # Llama tokenizers prepend BOS, as FastChat's MT-Bench answer generation does
        return self.tokenizer(self.prompt_text(turns)).input_ids

    def conversation_text(self, turns):
        return self._conversation(turns).get_prompt()


def make_template(model_cfg: DictConfig, tokenizer) -> ChatTemplate:
    name = model_cfg.template
    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    stop_strings = []
    system = model_cfg.get("system_message")
    system = SYSTEM_PROMPTS.get(system, system) if system is not None else None
    suffix = model_cfg.get("prompt_suffix") or ""
    if name == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise HarnessError(f"model '{model_cfg.name}' has no chat_template; set model.template to an "
                               "fschat template name such as vicuna_v1.1")
        template = HFChatTemplate(name, tokenizer, system_message=system, prompt_suffix=suffix)
    else:
        try:
            from fastchat.conversation import get_conv_template

            conv = get_conv_template(name)
        except KeyError as exc:
            raise HarnessError(f"unknown conversation template '{name}' for model '{model_cfg.name}'; "
                               "use chat_template or an fschat name (vicuna_v1.1, llama-2)") from exc
        stop_ids.update(conv.stop_token_ids or [])
        if conv.stop_str:
            stop_strings += [conv.stop_str] if isinstance(conv.stop_str, str) else list(conv.stop_str)
        template = FastChatTemplate(name, tokenizer, system_message=system, prompt_suffix=suffix)
    stop_ids.update(model_cfg.get("extra_stop_token_ids") or [])
    stop_strings += list(model_cfg.get("extra_stop_strings") or [])
    template.stop_token_ids = sorted(stop_ids)
    template.stop_strings = stop_strings
    return template
