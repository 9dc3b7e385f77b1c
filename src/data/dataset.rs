//! The in-memory view of a prepared dataset that models train and evaluate on.

use serde::{Deserialize, Serialize};

use super::preprocess::{Interaction, ItemRow};

/// Leave-one-out role of an interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "valid" => Some(Split::Valid),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name for reports (the prepared directory's name unless set).
    pub name: String,
    pub n_users: usize,
    pub n_items: usize,
    /// Train items of each user in time order.
    pub train: Vec<Vec<u32>>,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
    pub items: Vec<ItemRow>,
    pub users: Vec<String>,
}

impl Dataset {
    pub fn from_interactions(name: &str, users: Vec<String>, items: Vec<ItemRow>, xs: &[Interaction]) -> Dataset {
        let n_users = users.len();
        let mut train = vec![Vec::new(); n_users];
        let mut valid = vec![u32::MAX; n_users];
        let mut test = vec![u32::MAX; n_users];
        for x in xs {
            let u = x.user as usize;
            match x.split {
                Split::Train => train[u].push(x.item),
                Split::Valid => valid[u] = x.item,
                Split::Test => test[u] = x.item,
            }
        }
        Dataset { name: name.to_string(), n_users, n_items: items.len(), train, valid, test, items, users }
    }

    /// The sequence a model sees when predicting `split` for `user`: train items, plus the
    /// validation item when predicting the test item.
    pub fn history(&self, user: u32, split: Split) -> Vec<u32> {
        let u = user as usize;
        let mut h = self.train[u].clone();
        if split == Split::Test {
            h.push(self.valid[u]);
        }
        h
    }

    /// The held-out item of `user` for `split` (valid or test).
    pub fn target(&self, user: u32, split: Split) -> u32 {
        match split {
            Split::Valid => self.valid[user as usize],
            Split::Test => self.test[user as usize],
            Split::Train => panic!("the train split has no single target"),
        }
    }

    pub fn n_train(&self) -> usize {
        self.train.iter().map(Vec::len).sum()
    }
}
