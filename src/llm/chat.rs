//! Chat templates. Qwen2 and SmolLM2 both use ChatML (`<|im_start|>role\n…<|im_end|>\n`), each
//! with its own default system prompt (as their Jinja templates insert when none is given);
//! Llama 3 models use header tokens. The template is picked from the GGUF/HF chat template text.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChatTemplate {
    ChatMl {
        default_system: Option<String>,
    },
    Llama3,
    /// No template: the prompt is used as is.
    Raw,
}

const QWEN_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
const SMOL_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

impl ChatTemplate {
    /// Recognise the template from the model's Jinja source (`tokenizer.chat_template`).
    pub fn from_jinja(src: Option<&str>) -> Self {
        let Some(src) = src else { return ChatTemplate::Raw };
        if src.contains("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else if src.contains("<|im_start|>") {
            let default_system = if src.contains(QWEN_SYSTEM) {
                Some(QWEN_SYSTEM.to_string())
            } else if src.contains("SmolLM") {
                Some(SMOL_SYSTEM.to_string())
            } else {
                None
            };
            ChatTemplate::ChatMl { default_system }
        } else {
            ChatTemplate::Raw
        }
    }

    /// One user turn and the assistant header, ready to generate from.
    pub fn render(&self, system: Option<&str>, user: &str) -> String {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let mut s = String::new();
                if let Some(sys) = system.or(default_system.as_deref()) {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                s.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
                s
            }
            ChatTemplate::Llama3 => {
                let mut s = String::from("<|begin_of_text|>");
                if let Some(sys) = system {
                    s.push_str(&format!("<|start_header_id|>system<|end_header_id|>\n\n{sys}<|eot_id|>"));
                }
                s.push_str(&format!(
                    "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                ));
                s
            }
            ChatTemplate::Raw => match system {
                Some(sys) => format!("{sys}\n\n{user}"),
                None => user.to_string(),
            },
        }
    }
}
