//! The CustomResourceDefinitions, generated from the Rust types in
//! [`crate::api`]. `testrun-controller crdgen` prints them; `crds/` holds the
//! committed copies, which a test keeps equal to this output.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
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
        GeneratedCrd { file_name: "testruns.yaml", crd: explainable(TestRun::crd()) },
        GeneratedCrd { file_name: "prebuildpresets.yaml", crd: explainable(PrebuildPreset::crd()) },
        GeneratedCrd { file_name: "vmclasses.yaml", crd: explainable(VmClass::crd()) },
    ]
}

/// Drops `nullable` from every object with fields (`status`,
/// `status.started`, …): a kube-apiserver that publishes OpenAPI v2 (what
/// kubectl explain reads before 1.27) publishes a nullable object as its
/// description alone, so `kubectl explain` showed none of its fields. The
/// controller never writes such an object as null, and the apiserver drops
/// a null where the schema does not allow one.
fn explainable(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(root) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            not_nullable_objects(root);
        }
    }
    crd
}

fn not_nullable_objects(schema: &mut JSONSchemaProps) {
    if let Some(properties) = schema.properties.as_mut() {
        for property in properties.values_mut() {
            if property.properties.is_some() {
                property.nullable = None;
            }
            not_nullable_objects(property);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        not_nullable_objects(items);
    }
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
