//! ChatML rendering and tokenisation against transformers' `apply_chat_template` on the tiny
//! tokenizer (goldens from benches/peer/golden_tiny.py).

mod common;

use common::*;
use mo_align::tokenizer::{AssistantTurns, ChatTokenizer, Message};

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn render_and_ids_match_transformers() {
    for tiny in Tiny::BOTH {
        render_and_ids_match(tiny);
    }
}

/// Qwen2.5's template and Qwen3's (prompts with `enable_thinking=False`), on conversations
/// with a system prompt, several turns and `<think>` reasoning in answers.
fn render_and_ids_match(tiny: Tiny) {
    let tok = ChatTokenizer::from_file(&tiny.dir().join("tokenizer.json")).unwrap();
    let g = tiny.golden();
    for case in g["chat"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        assert_eq!(
            tok.render(&msgs, false),
            case["text"].as_str().unwrap(),
            "{tiny:?}"
        );
        let prompt = &msgs[..msgs.len() - 1];
        assert_eq!(
            tok.render(prompt, true),
            case["prompt_text"].as_str().unwrap(),
            "{tiny:?}"
        );
        // Segment-wise ids (prompt and responses tokenised separately) equal the whole render's
        // ids, up to the final "\n" after the last <|im_end|>, which is not trained.
        let enc = tok.encode_chat(&msgs, AssistantTurns::All).unwrap();
        let mut want = json_u32s(&case["ids"]);
        assert_eq!(want.pop(), Some(tok.encode("\n").unwrap()[0]));
        assert_eq!(enc.ids, want, "{tiny:?}");
    }
    for case in g["plain"].as_array().unwrap() {
        assert_eq!(
            tok.encode(case["text"].as_str().unwrap()).unwrap(),
            json_u32s(&case["ids"])
        );
    }
}

#[test]
fn label_mask_covers_assistant_content_and_im_end_only() {
    let tok = ChatTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let msgs = messages(&golden()["chat"][1]["messages"]);
    let enc = tok.encode_chat(&msgs, AssistantTurns::All).unwrap();
    // Rebuild what must be labelled: each assistant content + <|im_end|>, located token by token.
    let mut expected = vec![false; enc.ids.len()];
    let mut cursor = 0;
    for m in msgs.iter().filter(|m| m.role == "assistant") {
        let resp = tok.encode_response(&m.content).unwrap();
        let start = (cursor..enc.ids.len())
            .find(|&i| enc.ids[i..].starts_with(&resp))
            .expect("response ids present");
        for e in &mut expected[start..start + resp.len()] {
            *e = true;
        }
        cursor = start + resp.len();
    }
    assert_eq!(enc.labelled, expected);
    assert_eq!(enc.num_labelled(), expected.iter().filter(|&&x| x).count());
    // Every labelled run ends with <|im_end|>, and no <|im_start|> or system/user token is labelled.
    for (i, &l) in enc.labelled.iter().enumerate() {
        if l && (i + 1 == enc.ids.len() || !enc.labelled[i + 1]) {
            assert_eq!(enc.ids[i], tok.im_end);
        }
        if enc.ids[i] == tok.im_start {
            assert!(!l);
        }
    }
    // First-exchange mode stops after the first assistant turn.
    let first = tok.encode_chat(&msgs, AssistantTurns::First).unwrap();
    assert!(first.len() < enc.len());
    assert_eq!(first.ids[..], enc.ids[..first.len()]);
    assert_eq!(first.ids.last(), Some(&tok.im_end));
}

#[test]
fn default_system_prompt_and_prompt_response_split() {
    let tok = ChatTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let user = [Message::new("user", "Hi")];
    let text = tok.render(&user, true);
    assert!(text.starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    ));
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    let prompt = tok.encode_prompt(&user).unwrap();
    assert_eq!(prompt.last(), tok.encode("\n").unwrap().last());
    let conv = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
    ];
    let enc = tok.encode_chat(&conv, AssistantTurns::All).unwrap();
    assert_eq!(&enc.ids[..prompt.len()], &prompt[..]);
    assert_eq!(
        &enc.ids[prompt.len()..],
        &tok.encode_response("Hello!").unwrap()[..]
    );
    assert!(tok.encode_chat(&user, AssistantTurns::All).is_err());
}

#[test]
fn qwen3_prompts_close_an_empty_thinking_block_and_train_only_the_answer() {
    let tok = ChatTokenizer::from_file(&Tiny::Qwen3.dir().join("tokenizer.json")).unwrap();
    assert_eq!(tok.template, mo_align::tokenizer::ChatTemplate::Qwen3);
    let user = [Message::new("user", "Hi")];
    // No default system prompt; thinking disabled as enable_thinking=False renders it.
    assert_eq!(
        tok.render(&user, true),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    let conv = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
    ];
    let enc = tok.encode_chat(&conv, AssistantTurns::All).unwrap();
    let prompt = tok.encode_prompt(&user).unwrap();
    assert_eq!(&enc.ids[..prompt.len()], &prompt[..]);
    assert!(enc.labelled[..prompt.len()].iter().all(|l| !l));
    assert_eq!(
        &enc.ids[prompt.len()..],
        &tok.encode_response("Hello!").unwrap()[..]
    );
    assert!(enc.labelled[prompt.len()..].iter().all(|&l| l));
    // The thinking tags are single tokens that decoding with special tokens skipped keeps.
    let think = tok.encode("<think>").unwrap();
    assert_eq!(think.len(), 1);
    assert_eq!(tok.decode(&think, true).unwrap(), "<think>");
    // First-exchange mode renders the cut conversation: its one answer is the last, with a block.
    let two = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "Bye"),
        Message::new("assistant", "Bye!"),
    ];
    let first = tok.encode_chat(&two, AssistantTurns::First).unwrap();
    assert_eq!(first.ids, enc.ids);
    // In the whole conversation the earlier answer has no block (the template drops it).
    let all = tok.encode_chat(&two, AssistantTurns::All).unwrap();
    let text = tok.decode(&all.ids, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>")
    );
    assert_eq!(text.matches("<think>").count(), 1, "{text}");
}
