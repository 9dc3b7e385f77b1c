//! The stages as library functions, one file each, that the CLI, the service and the tests call
//! alike: [`stages`] (prepare, train, eval, a whole job), [`seeds`] (a run per seed and their
//! summary), [`features`] (patterns and reasons), [`replay`] (the chronological correction) and
//! [`session`] (ingestion into a run, one-shot or resident), with [`models`] (the model factory)
//! and [`setup`] (what the correction and a session both set up).

pub mod features;
pub mod models;
pub mod replay;
pub mod seeds;
pub mod session;
pub mod setup;
pub mod stages;
