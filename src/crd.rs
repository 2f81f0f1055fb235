//! The CustomResourceDefinitions, generated from the Rust types in
//! [`crate::api`]. `testrun-controller crdgen` prints them; `crds/` holds the
//! committed copies, which a test keeps equal to this output.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::api::{PrebuildPreset, TestRun, VmClass};

/// A generated CRD with the file name it is committed under in `crds/`.
pub struct GeneratedCrd {
    /// File name under `crds/`, e.g. `testruns.yaml`.
    pub file_name: &'static str,
    /// The definition.
    pub crd: CustomResourceDefinition,
}

/// Why a CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// Serializing a CRD to YAML failed.
    #[error("rendering CRD {name} as YAML: {source}")]
    Render {
        /// The CRD's name.
        name: String,
        /// What the serializer said.
        source: serde_norway::Error,
    },
}

/// Every CRD this controller serves, in a fixed order.
pub fn all() -> Vec<GeneratedCrd> {
    vec![
        GeneratedCrd { file_name: "testruns.yaml", crd: TestRun::crd() },
        GeneratedCrd { file_name: "prebuildpresets.yaml", crd: PrebuildPreset::crd() },
        GeneratedCrd { file_name: "vmclasses.yaml", crd: VmClass::crd() },
    ]
}

/// One CRD as a YAML document (starting with `---`).
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    let body = serde_norway::to_string(crd)
        .map_err(|source| CrdError::Render { name: crd.metadata.name.clone().unwrap_or_default(), source })?;
    Ok(format!("---\n{body}"))
}

/// Every CRD as one multi-document YAML stream, as `crdgen` prints it.
pub fn all_yaml() -> Result<String, CrdError> {
    all().iter().map(|g| to_yaml(&g.crd)).collect()
}
