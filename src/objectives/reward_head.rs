//! Reward-head regression on cached backbone features: masked MSE against normalised ratings.

use crate::model::ctx::ForwardCtx;
use crate::reward::{masked_sq_error, RewardHead};
use crate::train::{LossOutput, Objective};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct RatedFeatures {
    /// Row of the feature table.
    pub row: usize,
    pub targets: Vec<f32>,
    pub mask: Vec<f32>,
    /// Tokens the backbone ran over (throughput figures only).
    pub tokens: usize,
}

pub struct RewardRegression<'a> {
    pub head: &'a RewardHead,
    /// [N, H] features, one row per response.
    pub features: &'a Tensor,
}

impl Objective for RewardRegression<'_> {
    type Example = RatedFeatures;

    fn tokens(&self, ex: &RatedFeatures) -> usize {
        ex.tokens
    }

    /// One unit per observed rating, so the loss is the MSE over ratings that exist.
    fn weight(&self, ex: &RatedFeatures) -> f64 {
        ex.mask.iter().map(|&m| m as f64).sum()
    }

    fn loss(&self, batch: &[&RatedFeatures], _ctx: ForwardCtx) -> Result<LossOutput> {
        let dev = self.features.device();
        let rows: Vec<u32> = batch.iter().map(|e| e.row as u32).collect();
        let x = self
            .features
            .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let k = batch[0].targets.len();
        let flat = |f: &dyn Fn(&RatedFeatures) -> &Vec<f32>| -> Result<Tensor> {
            Tensor::from_vec(
                batch
                    .iter()
                    .flat_map(|e| f(e).iter().copied())
                    .collect::<Vec<f32>>(),
                (batch.len(), k),
                dev,
            )
        };
        let (targets, mask) = (flat(&|e| &e.targets)?, flat(&|e| &e.mask)?);
        let pred = self
            .head
            .predict(&x)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let err = masked_sq_error(&pred, &targets, &mask)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(LossOutput {
            loss_sum: err.sum_all()?,
            metrics: vec![],
        })
    }
}
