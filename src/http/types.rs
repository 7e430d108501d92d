//! Request parameters and response bodies of the API.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::infer::{scores, ModelInfo};

/// `top_k` when the query leaves it out (capped at the number of classes).
pub const DEFAULT_TOP_K: usize = 5;

/// The query parameters of the classify routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifyParams {
    /// How many classes to list, most probable first: 1..=classes.
    pub top_k: usize,
    /// Whether to return the raw logits too.
    pub logits: bool,
}

impl ClassifyParams {
    /// Validates the query's key-value pairs for a model with `classes` classes. Unknown keys,
    /// repeated keys and bad values are refused with a message naming the parameter.
    pub fn parse(pairs: &[(String, String)], classes: usize) -> Result<Self, ApiError> {
        let mut params = Self {
            top_k: DEFAULT_TOP_K.min(classes).max(1),
            logits: false,
        };
        let mut seen = HashSet::new();
        for (key, value) in pairs {
            if !seen.insert(key.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "query parameter `{key}` is given more than once"
                )));
            }
            match key.as_str() {
                "top_k" => {
                    params.top_k = value
                        .parse::<usize>()
                        .ok()
                        .filter(|k| (1..=classes).contains(k))
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "query parameter `top_k` must be an integer from 1 to {classes}, got {value:?}"
                            ))
                        })?;
                }
                "logits" => {
                    params.logits = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "query parameter `logits` must be true or false, got {value:?}"
                            )))
                        }
                    }
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter `{key}` (accepted: top_k, logits)"
                    )))
                }
            }
        }
        Ok(params)
    }
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub label: String,
    pub class_index: usize,
    pub probability: f32,
}

/// The answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// The most probable class.
    pub label: String,
    pub class_index: usize,
    /// Its probability.
    pub confidence: f32,
    /// The `top_k` most probable classes, most probable first.
    pub top_k: Vec<Prediction>,
    /// The raw logits, one per class (only with `logits=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

impl Classification {
    /// Softmax over one row of logits, ranked; ties keep the lower class index first.
    pub fn from_logits(logits: &[f32], labels: &[String], params: &ClassifyParams) -> Self {
        let probabilities = scores::softmax(logits);
        let label = |i: usize| {
            labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("class_{i}"))
        };
        let top_k: Vec<Prediction> = scores::ranked(logits)
            .into_iter()
            .take(params.top_k.max(1))
            .map(|i| Prediction {
                label: label(i),
                class_index: i,
                probability: probabilities[i],
            })
            .collect();
        let best = top_k.first().cloned().unwrap_or(Prediction {
            label: label(0),
            class_index: 0,
            probability: f32::NAN,
        });
        Self {
            label: best.label,
            class_index: best.class_index,
            confidence: best.probability,
            top_k,
            logits: params.logits.then(|| logits.to_vec()),
        }
    }
}

/// The answer of `/classify/batch`: one [`Classification`] per image, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchClassification {
    pub results: Vec<Classification>,
}

/// The body of the health routes when healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// How requests are batched and bounded, as `/v1/model` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchingInfo {
    pub max_batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub queue_capacity: usize,
    pub request_timeout_ms: u64,
    /// Most `image` fields one `/classify/batch` request may carry.
    pub max_images_per_request: usize,
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
}

/// The body of `GET /v1/model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    #[serde(flatten)]
    pub model: ModelInfo,
    pub batching: BatchingInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn query_defaults_and_valid_values() {
        let p = ClassifyParams::parse(&[], 10).unwrap();
        assert_eq!((p.top_k, p.logits), (5, false));
        let p = ClassifyParams::parse(&[], 3).unwrap();
        assert_eq!(p.top_k, 3);
        let p = ClassifyParams::parse(&pairs(&[("top_k", "10"), ("logits", "true")]), 10).unwrap();
        assert_eq!((p.top_k, p.logits), (10, true));
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        for (query, needle) in [
            (vec![("top_k", "0")], "`top_k`"),
            (vec![("top_k", "11")], "`top_k`"),
            (vec![("top_k", "-1")], "`top_k`"),
            (vec![("top_k", "three")], "`top_k`"),
            (vec![("logits", "yes")], "`logits`"),
            (vec![("topk", "3")], "`topk`"),
            (vec![("top_k", "3"), ("top_k", "4")], "`top_k`"),
        ] {
            let err = ClassifyParams::parse(&pairs(&query), 10).unwrap_err();
            assert_eq!(err.code(), "bad_request");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn softmax_ranking_and_labels() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let params = ClassifyParams {
            top_k: 2,
            logits: true,
        };
        let c = Classification::from_logits(&[1.0, 3.0, 2.0], &labels, &params);
        assert_eq!((c.label.as_str(), c.class_index), ("b", 1));
        let e = [1f64.exp(), 3f64.exp(), 2f64.exp()];
        let sum: f64 = e.iter().sum();
        assert!((f64::from(c.confidence) - e[1] / sum).abs() < 1e-6);
        let order: Vec<usize> = c.top_k.iter().map(|p| p.class_index).collect();
        assert_eq!(order, [1, 2]);
        assert!((f64::from(c.top_k[1].probability) - e[2] / sum).abs() < 1e-6);
        assert_eq!(c.logits.as_deref(), Some(&[1.0, 3.0, 2.0][..]));
        // Equal logits: the lower index first.
        let c = Classification::from_logits(&[5.0, 5.0, 1.0], &labels, &params);
        assert_eq!(c.class_index, 0);
        assert!(c.top_k[0].probability == c.top_k[1].probability);
    }

    #[test]
    fn logits_are_left_out_unless_asked_for() {
        let params = ClassifyParams {
            top_k: 1,
            logits: false,
        };
        let c = Classification::from_logits(&[0.0, 1.0], &[], &params);
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("logits").is_none());
        assert_eq!(json["label"], "class_1");
    }
}
