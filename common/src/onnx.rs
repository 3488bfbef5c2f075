//! What kiln reads of an ONNX model's file without running it: the files a model
//! saved with external data keeps its tensors in.

use std::path::{Component, Path};

use kiln_proto::onnx::{GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto};
use prost::Message as _;

use crate::{Error, Result};

/// Why tract does not load a model saved with external data (kiln hands engines
/// the model's bytes; ONNX Runtime takes the external files from memory too).
pub const TRACT_REFUSES_EXTERNAL_DATA: &str =
    "tract cannot load the model: its tensors are kept in external data files, which ONNX \
     Runtime serves";

/// The external data files an ONNX model names (the `location` of each tensor
/// kept outside the model file), each once, in the order first named. A location
/// that is absolute or climbs out of the model's directory is an error; bytes that
/// are not an ONNX model name none (an engine then says what is wrong).
pub fn external_locations(onnx: &[u8]) -> Result<Vec<String>> {
    match ModelProto::decode(onnx) {
        Ok(model) => locations_in(&model),
        Err(_) => Ok(Vec::new()),
    }
}

/// [`external_locations`] of a model already decoded.
pub fn locations_in(model: &ModelProto) -> Result<Vec<String>> {
    let mut tensors = Vec::new();
    if let Some(graph) = &model.graph {
        graph_tensors(graph, &mut tensors);
    }
    for function in &model.functions {
        nodes_tensors(&function.node, &mut tensors);
    }
    let mut locations: Vec<String> = Vec::new();
    for tensor in tensors
        .into_iter()
        .filter(|t| t.data_location == 1 || !t.external_data.is_empty())
    {
        let location = tensor
            .external_data
            .iter()
            .find(|e| e.key == "location")
            .map(|e| e.value.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tensor {:?} is kept in external data but names no location",
                    tensor.name
                ))
            })?;
        let inside = !location.is_empty()
            && Path::new(&location)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(Error::InvalidArgument(format!(
                "tensor {:?} is kept in {location:?}, which is not a file in the model's directory",
                tensor.name
            )));
        }
        if !locations.contains(&location) {
            locations.push(location);
        }
    }
    Ok(locations)
}

/// Why tract cannot load a model, where it can be told from the file alone:
/// tensors kept in external data files, string inputs or outputs, or outputs
/// that are sequences or maps (ZipMap); `None` when nothing says so.
pub fn tract_refusal(model: &ModelProto) -> Option<String> {
    use kiln_proto::onnx::{tensor_proto::DataType as Elem, type_proto::Value};
    if locations_in(model).is_ok_and(|l| !l.is_empty()) {
        return Some(TRACT_REFUSES_EXTERNAL_DATA.to_string());
    }
    let graph = model.graph.as_ref()?;
    graph.input.iter().chain(&graph.output).find_map(|value| {
        let why = match value.r#type.as_ref()?.value.as_ref()? {
            Value::TensorType(t) if t.elem_type == Elem::String as i32 => {
                "strings (BYTES), which ONNX Runtime serves"
            }
            Value::TensorType(_) => return None,
            Value::SequenceType(_) | Value::MapType(_) => {
                "a sequence or map (ZipMap), which ONNX Runtime serves"
            }
        };
        Some(format!(
            "tract cannot load the model: {:?} is {why}",
            value.name
        ))
    })
}

/// Every tensor of a graph: initializers (sparse ones too) and what its nodes'
/// attributes hold, subgraphs included.
fn graph_tensors<'a>(graph: &'a GraphProto, out: &mut Vec<&'a TensorProto>) {
    out.extend(&graph.initializer);
    for sparse in &graph.sparse_initializer {
        sparse_tensors(sparse, out);
    }
    nodes_tensors(&graph.node, out);
}

fn nodes_tensors<'a>(nodes: &'a [NodeProto], out: &mut Vec<&'a TensorProto>) {
    for attribute in nodes.iter().flat_map(|n| &n.attribute) {
        out.extend(attribute.t.iter().chain(&attribute.tensors));
        for sparse in attribute
            .sparse_tensor
            .iter()
            .chain(&attribute.sparse_tensors)
        {
            sparse_tensors(sparse, out);
        }
        for graph in attribute.g.iter().chain(&attribute.graphs) {
            graph_tensors(graph, out);
        }
    }
}

fn sparse_tensors<'a>(sparse: &'a SparseTensorProto, out: &mut Vec<&'a TensorProto>) {
    out.extend(sparse.values.iter().chain(&sparse.indices));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::onnx::{AttributeProto, StringStringEntryProto};

    fn model(locations: &[&str]) -> Vec<u8> {
        let tensor = |i: usize, location: &str| TensorProto {
            name: format!("w{i}"),
            data_location: 1,
            external_data: vec![StringStringEntryProto {
                key: "location".into(),
                value: location.into(),
            }],
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                initializer: locations
                    .iter()
                    .enumerate()
                    .map(|(i, l)| tensor(i, l))
                    .chain([TensorProto::default()])
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn tract_is_known_to_refuse_strings_zipmaps_and_external_data() {
        use kiln_proto::onnx::{type_proto, TypeProto, ValueInfoProto};
        let typed = |name: &str, value: type_proto::Value| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(value),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tensor = |elem: i32| {
            type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: None,
            })
        };
        let with = |input: ValueInfoProto| {
            ModelProto {
                graph: Some(GraphProto {
                    input: vec![input],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let tract_refusal =
            |onnx: Vec<u8>| tract_refusal(&ModelProto::decode(&onnx[..]).expect("ours"));
        assert_eq!(tract_refusal(with(typed("x", tensor(1)))), None);
        let strings = tract_refusal(with(typed("text", tensor(8)))).expect("refused");
        assert!(strings.contains("\"text\" is strings (BYTES)"), "{strings}");
        let maps = type_proto::Value::SequenceType(Box::default());
        let zipmap = tract_refusal(with(typed("probabilities", maps))).expect("refused");
        assert!(zipmap.contains("sequence or map"), "{zipmap}");
        assert_eq!(
            tract_refusal(model(&["w.data"])).as_deref(),
            Some(TRACT_REFUSES_EXTERNAL_DATA)
        );
    }

    fn graph_of(model: &mut ModelProto) -> &mut GraphProto {
        model.graph.as_mut().expect("a graph")
    }

    #[test]
    fn external_files_are_named_once_and_only_inside_the_models_directory() {
        assert_eq!(
            external_locations(&model(&["w.data", "sub/x.bin", "w.data"])),
            Ok(vec!["w.data".to_string(), "sub/x.bin".to_string()])
        );
        assert_eq!(external_locations(&model(&[])), Ok(vec![]));
        // Tensors in a Constant node inside an If's branch, and a sparse
        // initializer's values, count as well.
        let mut nested = ModelProto::decode(&model(&["w.data"])[..]).expect("ours");
        let inner = ModelProto::decode(&model(&["../escape"])[..]).expect("ours");
        let constant = NodeProto {
            op_type: "Constant".into(),
            attribute: vec![AttributeProto {
                name: "value".into(),
                t: inner.graph.as_ref().map(|g| g.initializer[0].clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let branch = NodeProto {
            op_type: "If".into(),
            attribute: vec![AttributeProto {
                name: "then_branch".into(),
                g: Some(GraphProto {
                    node: vec![constant],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let graph = nested.graph.as_mut().expect("a graph");
        graph.sparse_initializer.push(SparseTensorProto {
            values: ModelProto::decode(&model(&["sparse.bin"])[..])
                .expect("ours")
                .graph
                .map(|g| g.initializer[0].clone()),
            ..Default::default()
        });
        assert_eq!(
            external_locations(&nested.encode_to_vec()),
            Ok(vec!["w.data".to_string(), "sparse.bin".to_string()])
        );
        graph_of(&mut nested).node.push(branch);
        let refused = external_locations(&nested.encode_to_vec());
        assert!(
            matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains("\"../escape\"")),
            "{refused:?}"
        );
        assert_eq!(external_locations(b"not onnx at all"), Ok(vec![]));
        for bad in ["../secret", "/etc/passwd", "", "a/../../b"] {
            let refused = external_locations(&model(&[bad]));
            assert!(
                matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains("not a file in the model's directory")),
                "{bad:?}: {refused:?}"
            );
        }
    }
}
