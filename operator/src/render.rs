//! `kubemaas-operator render -f md.yaml`: every child the operator would create, as YAML, without a
//! cluster (for review and GitOps diffs).

use kube::ResourceExt;
use kubemaas_crds::v1alpha1::ModelDeployment;

use crate::controller::build::{self, BuildConfig};

/// Errors rendering.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not a ModelDeployment.
    #[error("failed to parse a ModelDeployment from {source_name}: {message}")]
    Parse {
        /// File name.
        source_name: String,
        /// Why.
        message: String,
    },
    /// The spec is invalid.
    #[error("ModelDeployment {name} is invalid: {message}")]
    Invalid {
        /// Name.
        name: String,
        /// Why.
        message: String,
    },
    /// YAML output failed.
    #[error("failed to write YAML: {0}")]
    Yaml(String),
}

/// Renders every document of `input` (one or more ModelDeployments separated by `---`).
pub fn render(input: &str, source_name: &str, cfg: &BuildConfig) -> Result<String, RenderError> {
    let parse = |message: String| RenderError::Parse {
        source_name: source_name.into(),
        message,
    };
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(input).map_err(|e| parse(e.to_string()))?;
    let mut out = String::new();
    // Other kinds in the file (e.g. the Secret next to a ModelDeployment) are not ours to render.
    let ours = |d: &serde_json::Value| d["kind"] == "ModelDeployment";
    for doc in docs.into_iter().filter(ours) {
        let mut md: ModelDeployment = serde_json::from_value(doc).map_err(|e| parse(e.to_string()))?;
        if md.metadata.namespace.is_none() {
            md.metadata.namespace = Some("default".into());
        }
        // Without a cluster there is no UID; a placeholder keeps ownerReferences visible in the output.
        md.metadata
            .uid
            .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
        if let Err(e) = md.validate_cel() {
            return Err(RenderError::Invalid {
                name: md.name_any(),
                message: e.to_string(),
            });
        }
        crate::controller::validate::validate(&md).map_err(|e| RenderError::Invalid {
            name: md.name_any(),
            message: e.to_string(),
        })?;
        let c = build::children(&md, cfg);
        let mut objects: Vec<serde_json::Value> = Vec::new();
        let mut push = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map(|v| objects.push(v))
                .map_err(|e| RenderError::Yaml(e.to_string()))
        };
        push(serde_json::to_value(&c.deployment))?;
        push(serde_json::to_value(&c.service))?;
        if let Some(h) = &c.hpa {
            push(serde_json::to_value(h))?;
        }
        if let Some(p) = &c.pdb {
            push(serde_json::to_value(p))?;
        }
        for o in objects {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&o).map_err(|e| RenderError::Yaml(e.to_string()))?);
        }
    }
    Ok(out)
}
