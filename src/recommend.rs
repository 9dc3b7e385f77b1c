//! Recommendations from a trained run: the top-k items a user has not seen, with the matched
//! reasons as the explanation for a CUREC model. `curec recommend` opens a [`Recommender`] per
//! call; `curec serve` keeps one and replaces it after each checkpoint; the report uses it for
//! its explanation cards.

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::data::{Dataset, Split};
use crate::pipeline::models::{build_curec, build_model};
use crate::rec::curec::Curec;
use crate::rec::{Model, ModelKind};
use crate::run_dir::TrainedRun;

/// One recommended item with its explanation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recommendation {
    pub item: String,
    pub title: String,
    pub score: f32,
    /// The item's reasons that matched this user most (attention weight, averaged over heads).
    pub reasons: Vec<ReasonWeight>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReasonWeight {
    pub text: String,
    pub weight: f32,
}

/// `curec recommend`: the top `k` items for a user (raw id) after everything the user has seen
/// (train, valid and test), each with its top `n_reasons` reasons when the run is a CUREC model.
pub fn recommend(run: &Path, raw_user: &str, k: usize, n_reasons: usize) -> anyhow::Result<Vec<Recommendation>> {
    Recommender::open(run)?.recommend(raw_user, k, n_reasons)
}

enum Loaded {
    Curec(Box<Curec>),
    Other(Box<dyn Model>),
}

/// A trained run loaded once to answer many recommendation queries (`curec recommend` opens one
/// per call, `curec serve` keeps one and replaces it after each ingest).
pub struct Recommender {
    kind: ModelKind,
    ds: Dataset,
    trained_users: usize,
    /// Users with completed ingests: their whole history, ingested items in event time.
    ingested: std::collections::HashMap<u32, Vec<u32>>,
    user_index: std::collections::HashMap<String, u32>,
    model: Loaded,
    /// Tower states (`1 × d`) of the users served so far (see [`Self::user_states`]).
    states: std::sync::Mutex<std::collections::HashMap<u32, Tensor>>,
    /// SHA-256 of `model.safetensors`: states carry over to a new recommender only under the
    /// same weights.
    weights_digest: [u8; 32],
}

impl Recommender {
    /// The run's model, dataset and the interactions ingested since training (new users included).
    pub fn open(run: &Path) -> anyhow::Result<Self> {
        let TrainedRun { kind, mut ds, cfg, log, .. } = TrainedRun::open(run, None)?;
        let trained_users = ds.n_users;
        let crate::replay::ingest_log::Ingested { mut added, retracted } =
            crate::replay::ingest_log::ingested_sequences(run, &mut ds)?;
        // Users with ingests: their whole history in event time (late interactions in place,
        // retracted ones out).
        for &(u, _) in &retracted {
            added.entry(u).or_default();
        }
        let ingested = if added.keys().any(|&u| (u as usize) < trained_users) {
            let mut by_user: std::collections::HashMap<u32, [Vec<(i64, u32)>; 3]> =
                added.keys().filter(|&&u| (u as usize) < trained_users).map(|&u| (u, Default::default())).collect();
            for x in &log {
                if retracted.contains(&(x.user, x.item)) {
                    continue;
                }
                if let Some(parts) = by_user.get_mut(&x.user) {
                    let k = match x.split {
                        Split::Train => 0,
                        Split::Valid => 1,
                        Split::Test => 2,
                    };
                    parts[k].push((x.timestamp, x.item));
                }
            }
            added
                .into_iter()
                .map(|(u, late)| {
                    let prepared: Vec<(i64, u32)> = by_user.remove(&u).map(|p| p.concat()).unwrap_or_default();
                    (u, crate::replay::ingest_log::merge_event_time(&prepared, &late))
                })
                .collect()
        } else {
            added.into_iter().map(|(u, v)| (u, v.into_iter().map(|(_, i)| i).collect())).collect()
        };
        let model = if kind == ModelKind::Curec {
            let mut m = build_curec(&ds, &cfg, &Device::Cpu)?;
            m.load(&run.join("model.safetensors"))?;
            Loaded::Curec(Box::new(m))
        } else {
            let mut m = build_model(kind, &ds, &cfg, &Device::Cpu)?;
            m.load(&run.join("model.safetensors"))?;
            Loaded::Other(m)
        };
        let user_index = ds.users.iter().enumerate().map(|(i, u)| (u.clone(), i as u32)).collect();
        let weights_digest = {
            use sha2::Digest as _;
            let path = run.join("model.safetensors");
            let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            sha2::Sha256::digest(&bytes).into()
        };
        Ok(Self { kind, ds, trained_users, ingested, user_index, model, states: Default::default(), weights_digest })
    }

    /// The user states computed so far, with what they were computed from, for
    /// [`Self::warm`] of the recommender that replaces this one.
    pub fn states(&self) -> UserStates {
        let cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let by_user = self
            .ds
            .users
            .iter()
            .filter_map(|raw| {
                let (u, seen) = self.seen(raw).ok()?;
                Some((raw.clone(), (seen, cache.get(&u)?.clone())))
            })
            .collect();
        UserStates { weights_digest: self.weights_digest, by_user }
    }

    /// Compute the tower state of every user now (each alone, as a request would), taking them
    /// from `previous` where the weights and the user's history are the same, so that the first
    /// request of each user costs no more than the others. Returns (computed, carried over).
    /// A no-op for models without a separate user tower.
    pub fn warm(&self, previous: Option<&UserStates>) -> anyhow::Result<(usize, usize)> {
        let Loaded::Curec(m) = &self.model else { return Ok((0, 0)) };
        let previous = previous.filter(|p| p.weights_digest == self.weights_digest);
        let (mut computed, mut carried) = (0, 0);
        for raw in &self.ds.users {
            let Ok((u, seen)) = self.seen(raw) else { continue };
            if self.states.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&u) {
                continue;
            }
            let old = previous.and_then(|p| p.by_user.get(raw)).filter(|(s, _)| *s == seen);
            let state = match old {
                Some((_, t)) => {
                    carried += 1;
                    t.clone()
                }
                None => {
                    computed += 1;
                    m.user_states(std::slice::from_ref(&seen))?
                }
            };
            self.states.lock().unwrap_or_else(|p| p.into_inner()).insert(u, state);
        }
        Ok((computed, carried))
    }

    /// Whether the raw user id is known (trained or ingested).
    pub fn knows(&self, raw_user: &str) -> bool {
        self.user_index.contains_key(raw_user)
    }

    /// Raw ids of the users (ingested ones included).
    pub fn user_ids(&self) -> Vec<String> {
        self.ds.users.clone()
    }

    /// Raw ids of the items the model scores.
    pub fn item_ids(&self) -> Vec<String> {
        self.ds.items[..self.ds.n_items].iter().map(|i| i.raw_id.clone()).collect()
    }

    /// A user's whole history as the model reads it (raw item ids, oldest first): the prepared
    /// log with the ingested interactions in event time (items new to the model left out).
    pub fn history(&self, raw_user: &str) -> anyhow::Result<Vec<String>> {
        let (_, seen) = self.seen(raw_user)?;
        Ok(seen.into_iter().map(|i| self.ds.items[i as usize].raw_id.clone()).collect())
    }

    /// Users and items the model serves (ingested ones included).
    pub fn sizes(&self) -> (usize, usize) {
        (self.ds.users.len(), self.ds.n_items)
    }

    /// Top `k` unseen items for a user, each with its top `n_reasons` matched reasons.
    pub fn recommend(&self, raw_user: &str, k: usize, n_reasons: usize) -> anyhow::Result<Vec<Recommendation>> {
        self.recommend_many(&[Query { user: raw_user.to_string(), k, n_reasons }]).pop().expect("one answer per query")
    }

    /// The items a user has seen (train, valid, test and ingested), or why the user cannot be
    /// served.
    fn seen(&self, raw_user: &str) -> anyhow::Result<(u32, Vec<u32>)> {
        let ds = &self.ds;
        let user = *self.user_index.get(raw_user).with_context(|| {
            format!(
                "--user '{raw_user}': no such user in dataset {} or its ingests (raw ids as in the input log)",
                ds.name
            )
        })?;
        let mut seen = Vec::new();
        if let Some(merged) = self.ingested.get(&user) {
            // The user's whole history with the ingests in event time (see `open`).
            seen = merged.clone();
        } else if (user as usize) < self.trained_users {
            seen = ds.history(user, Split::Test);
            seen.push(ds.test[user as usize]);
        }
        if (user as usize) >= self.trained_users {
            anyhow::ensure!(
                self.kind != ModelKind::Ncf,
                "--user '{raw_user}': added by ingestion after training, and {} learns an embedding per user; use a sequential model",
                self.kind.name()
            );
        }
        anyhow::ensure!(
            !seen.is_empty(),
            "--user '{raw_user}': no interaction with an item the model knows yet (ingested items are new to it)"
        );
        Ok((user, seen))
    }

    /// [`Self::recommend`] for several queries in one ranking pass (`curec serve` batches the
    /// requests that arrive together). Answers come in query order; a query that cannot be
    /// served (unknown user, …) gets its error without failing the others. Each answer is the
    /// one the query would get alone.
    pub fn recommend_many(&self, queries: &[Query]) -> Vec<anyhow::Result<Vec<Recommendation>>> {
        let ds = &self.ds;
        let mut out: Vec<Option<anyhow::Result<Vec<Recommendation>>>> = Vec::with_capacity(queries.len());
        let mut users = Vec::new();
        let mut seens = Vec::new();
        let mut rows = Vec::new(); // query index of each scored row
        for (q, query) in queries.iter().enumerate() {
            match self.seen(&query.user) {
                Ok((u, s)) => {
                    users.push(u);
                    seens.push(s);
                    rows.push(q);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !users.is_empty() {
            let n = ds.n_items;
            let scored = (|| -> anyhow::Result<Scored> {
                Ok(match &self.model {
                    Loaded::Curec(m) => {
                        // One user at a time: a batched matmul may round differently with other
                        // rows beside it, and an answer must not depend on the traffic around it.
                        let eu = self.user_states(m, &users, &seens)?;
                        let (mut scores, mut weights) = (Vec::new(), Vec::new());
                        for (r, (&u, seen)) in users.iter().zip(&seens).enumerate() {
                            let (s, w) =
                                m.score_states(&[u], &eu.narrow(0, r, 1)?, std::slice::from_ref(seen), true)?;
                            scores.extend(s.flatten_all()?.to_vec1::<f32>()?);
                            weights.extend(w.expect("weights were asked for").flatten_all()?.to_vec1::<f32>()?);
                        }
                        (scores, Some((m.as_ref(), weights)))
                    }
                    Loaded::Other(m) => {
                        let mut tmp = ds.clone();
                        for (&u, s) in users.iter().zip(&seens) {
                            tmp.train[u as usize] = s.clone();
                        }
                        (m.score(&tmp, &users, Split::Valid)?, None)
                    }
                })
            })();
            match scored {
                Err(e) => {
                    let msg = format!("{e:#}");
                    for &q in &rows {
                        out[q] = Some(Err(anyhow::anyhow!("{msg}")));
                    }
                }
                Ok((scores, weights)) => {
                    for (r, (&q, seen)) in rows.iter().zip(&seens).enumerate() {
                        let scores = &scores[r * n..(r + 1) * n];
                        let w = weights.as_ref().map(|(m, w)| {
                            let l = m.bank().max_list();
                            (*m, &w[r * n * l..(r + 1) * n * l])
                        });
                        out[q] = Some(Ok(self.top(scores, w, seen, queries[q].k, queries[q].n_reasons)));
                    }
                }
            }
        }
        out.into_iter().map(|a| a.expect("every query answered")).collect()
    }

    /// The tower states of `users` after `seens` (`U × d`): kept per user, since they change
    /// only when the user's history does (and a history changes only by an ingest, which opens
    /// a new recommender). A state is always computed for its user alone, so an answer does
    /// not depend on which requests shared its ranking pass or came before it.
    fn user_states(&self, m: &Curec, users: &[u32], seens: &[Vec<u32>]) -> anyhow::Result<Tensor> {
        let mut cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::with_capacity(users.len());
        for (&u, seen) in users.iter().zip(seens) {
            let row = match cache.get(&u) {
                Some(r) => r.clone(),
                None => {
                    let r = m.user_states(std::slice::from_ref(seen))?;
                    cache.insert(u, r.clone());
                    r
                }
            };
            rows.push(row);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// The top `k` unseen items of one user's `scores`, each with its `n_reasons` heaviest
    /// reasons under `weights` (`N × L`).
    fn top(
        &self,
        scores: &[f32],
        weights: Option<(&Curec, &[f32])>,
        seen: &[u32],
        k: usize,
        n_reasons: usize,
    ) -> Vec<Recommendation> {
        let ds = &self.ds;
        let seen: std::collections::HashSet<u32> = seen.iter().copied().collect();
        let mut order: Vec<u32> = (0..ds.n_items as u32).filter(|i| !seen.contains(i)).collect();
        let cmp = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
        if k < order.len() {
            order.select_nth_unstable_by(k, cmp);
            order.truncate(k);
        }
        order.sort_by(cmp);
        order
            .into_iter()
            .map(|i| {
                let reasons = match weights {
                    Some((m, w)) => {
                        let bank = m.bank();
                        let l = bank.max_list();
                        let mut rs: Vec<ReasonWeight> = bank.lists[i as usize]
                            .iter()
                            .enumerate()
                            .map(|(j, &(r, _))| ReasonWeight {
                                text: bank.texts[r as usize].clone(),
                                weight: w[i as usize * l + j],
                            })
                            .collect();
                        rs.sort_by(|a, b| b.weight.total_cmp(&a.weight));
                        rs.truncate(n_reasons);
                        rs
                    }
                    None => Vec::new(),
                };
                Recommendation {
                    item: ds.items[i as usize].raw_id.clone(),
                    title: ds.items[i as usize].info.title.clone(),
                    score: scores[i as usize],
                    reasons,
                }
            })
            .collect()
    }
}

/// Tower states by raw user id, with the history each was computed after, and the digest of
/// the weights that computed them (see [`Recommender::warm`]).
pub struct UserStates {
    weights_digest: [u8; 32],
    by_user: std::collections::HashMap<String, (Vec<u32>, Tensor)>,
}

/// Scores `U × N` of one ranking pass, and for a CUREC model its reason weights `U × N × L`.
type Scored<'a> = (Vec<f32>, Option<(&'a Curec, Vec<f32>)>);

/// One recommendation query: a raw user id, how many items, how many reasons per item.
#[derive(Debug, Clone)]
pub struct Query {
    pub user: String,
    pub k: usize,
    pub n_reasons: usize,
}
