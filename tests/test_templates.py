"""Chat templates, byte for byte: the Llama-2-chat configs build the prompt EAGLE's Llama-2-chat evaluation
builds (fschat's llama-2 template, the default Llama-2 system prompt, a space after [/INST]); the Vicuna
configs build fschat's vicuna_v1.1 prompt as FastChat / Spec-Bench do."""

from __future__ import annotations

import pytest
from fastchat.conversation import get_conv_template
from fastchat.model import get_conversation_template

from harness.infra.errors import HarnessError
from harness.model.loading import model_config
from harness.model.templates import SYSTEM_PROMPTS, make_template

QUESTION = ["Compose an engaging travel blog post about a recent trip to Hawaii.",
            "Rewrite your previous response. Start every sentence with the letter A."]
ANSWER = "  Aloha! Here is my post about Hawaii...</s> trailing text the model wrote past its stop"

# The default Llama-2-chat system prompt, typed here from Meta's Llama-2 release (the text EAGLE's
# gen_ea_answer_llama2chat.py sets), independently of harness/model/templates.py.
LLAMA2_SYSTEM = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
                 "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
                 "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
                 "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, "
                 "explain why instead of answering something not correct. If you don't know the answer to a "
                 "question, please don't share false information.")


def eagle_llama2_prompts(answer: str) -> list[str]:
    """The two MT-Bench prompts as EAGLE's Llama-2-chat evaluation writes them with fschat: the adapter's
    template, the system prompt set, `get_prompt() + " "`, the first answer cut at </s> and stripped."""
    conv = get_conversation_template("llama-2-chat")
    conv.system_message = LLAMA2_SYSTEM
    prompts = []
    for turn, question in enumerate(QUESTION):
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        prompts.append(conv.get_prompt() + " ")
        output = answer[: answer.find("</s>")] if answer.find("</s>") > 0 else answer
        conv.messages[-1][-1] = output.strip()
    return prompts


def history_prompts(template, answer: str) -> list[str]:
    """Our multi-turn protocol (ChatTemplate.turn_prompt) in text: earlier answers cleaned, then the prompt."""
    return [template.prompt_text([(q, template.clean_answer(answer)) for q in QUESTION[:turn]]
                                 + [(QUESTION[turn], None)]) for turn in range(len(QUESTION))]


@pytest.mark.parametrize("name", ["llama2-7b-chat", "llama2-13b-chat", "llama2-70b-chat"])
def test_llama2_chat_prompts_are_eagles_byte_for_byte(name):
    template = make_template(model_config(name), tokenizer=_NoTokenizer())
    assert template.system_message == LLAMA2_SYSTEM == SYSTEM_PROMPTS["llama-2-default"]
    ours, theirs = history_prompts(template, ANSWER), eagle_llama2_prompts(ANSWER)
    assert ours == theirs
    assert ours[0].startswith("[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "\n<</SYS>>\n\n" + QUESTION[0])
    assert ours[0].endswith(" [/INST] ") and ours[1].endswith(QUESTION[1] + " [/INST] ")
    assert "Aloha! Here is my post about Hawaii... </s><s>[INST]" in ours[1]
    assert "</s>" in template.stop_strings and 2 in template.stop_token_ids


def test_the_suffix_and_system_prompt_are_options_with_fschats_defaults():
    cfg = model_config("llama2-7b-chat")
    cfg.system_message, cfg.prompt_suffix = None, ""
    plain = make_template(cfg, tokenizer=_NoTokenizer())
    conv = get_conv_template("llama-2")
    conv.append_message(conv.roles[0], QUESTION[0])
    conv.append_message(conv.roles[1], None)
    assert plain.prompt_text([(QUESTION[0], None)]) == conv.get_prompt()
    cfg.system_message = "Answer in one line."               # a literal system prompt, not a name
    assert "<<SYS>>\nAnswer in one line.\n<</SYS>>" in make_template(cfg, _NoTokenizer()).prompt_text([(QUESTION[0], None)])


@pytest.mark.parametrize("name", ["vicuna-7b-v1.3", "vicuna-13b-v1.3", "vicuna-7b-v1.5", "vicuna-13b-v1.5"])
def test_vicuna_prompts_are_fastchats(name):
    template = make_template(model_config(name), tokenizer=_NoTokenizer())
    conv = get_conversation_template("vicuna")                # Spec-Bench's eval.py / FastChat's gen_model_answer
    conv.append_message(conv.roles[0], QUESTION[0])
    conv.append_message(conv.roles[1], None)
    assert template.prompt_text([(QUESTION[0], None)]) == conv.get_prompt()
    assert template.prompt_text([(QUESTION[0], None)]).endswith("ASSISTANT:")


def test_an_unknown_template_is_one_line():
    cfg = model_config("vicuna-7b-v1.3")
    cfg.template = "vicuna_v9"
    with pytest.raises(HarnessError, match="unknown conversation template 'vicuna_v9'"):
        make_template(cfg, _NoTokenizer())


class _NoTokenizer:
    """Prompt text needs no tokenizer; Llama-2's eos id (2) for the stop list."""
    eos_token_id = 2
