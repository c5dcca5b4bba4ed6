//! Parameters with roles. Every weight of the network is a [`Param`]: *trainable* (an f32 master
//! `Var` that the forward pass casts to the compute dtype, so its gradient reaches the master),
//! *frozen* (stored once, already in the compute dtype, with no gradient and no optimizer state)
//! or *quantized* (frozen and stored in 4 bits, QLoRA's base, dequantised in
//! [`Param::for_compute`]; see [`crate::quant`]).
//!
//! The trainable ones, in checkpoint order, make [`TrainableParams`]: the only parameters the
//! optimizer, clipping and gradient reduction ever see, laid end to end in a flat space
//! ([`FlatLayout`]) so that a rank can own a contiguous range of it.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use whet_shared::lora::AdapterPlan;

use super::qwen3::ModelError;
use crate::quant::{QuantOptions, QuantizedTensor, Quantizer};
use crate::tensor_files::MappedWeights;

/// One weight of the network.
#[derive(Debug, Clone)]
pub enum Param {
    /// Trained: the master copy (f32), cast to the compute dtype on use.
    Trainable(Var),
    /// Not trained: stored once in the compute dtype.
    Frozen(Tensor),
    /// Not trained: stored in 4 bits (bitsandbytes' NF4/FP4), dequantised on every use.
    Quantized(Arc<QuantizedTensor>),
}

impl Param {
    /// The weight as the forward pass uses it, in `dtype`.
    pub fn for_compute(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Param::Trainable(var) => var.as_tensor().to_dtype(dtype),
            Param::Frozen(tensor) => tensor.to_dtype(dtype),
            Param::Quantized(quantized) => quantized.dequantize(dtype),
        }
    }

    /// The stored value without any graph: the master, the frozen tensor, or the quantized
    /// weight dequantised to f32.
    pub fn value(&self) -> Tensor {
        match self {
            Param::Trainable(var) => var.as_detached_tensor(),
            Param::Frozen(tensor) => tensor.clone(),
            // Tensor ops over shapes checked when it was made: only allocation can fail.
            Param::Quantized(quantized) => quantized
                .dequantize(DType::F32)
                .expect("dequantizing a 4-bit weight (out of memory?)"),
        }
    }

    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }

    pub fn elem_count(&self) -> usize {
        match self {
            Param::Trainable(var) => var.elem_count(),
            Param::Frozen(tensor) => tensor.elem_count(),
            Param::Quantized(quantized) => quantized.elem_count(),
        }
    }

    /// Bytes the stored weight takes on its device (packed codes and scales when quantized).
    pub fn resident_bytes(&self) -> usize {
        match self {
            Param::Trainable(var) => var.elem_count() * var.dtype().size_in_bytes(),
            Param::Frozen(tensor) => tensor.elem_count() * tensor.dtype().size_in_bytes(),
            Param::Quantized(quantized) => quantized.resident_bytes(),
        }
    }
}

/// Whether `name` is one of the weights QLoRA stores in 4 bits: every linear of the decoder
/// layers — attention q/k/v/o and the MLP's gate/up/down, dense or per expert. Embeddings,
/// norms, biases and `lm_head` stay in the compute dtype (transformers' bitsandbytes
/// integration skips the output embedding too), and so does the MoE router (`mlp.gate`): it is
/// tiny, and its logits make a discrete top-k choice that 4-bit noise would flip, which changes
/// the routing and the aux loss, not just a product (transformers 5 keeps it a plain parameter,
/// which bitsandbytes never replaces).
pub fn is_quantized_linear(name: &str) -> bool {
    let module = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.strip_suffix(".weight"))
        .and_then(|rest| rest.rsplit('.').next());
    // The decoder's projections are exactly what `all-linear` names.
    module.is_some_and(|m| whet_shared::lora::ALL_LINEAR.contains(&m))
}

/// Which parameters a model trains.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Trainable {
    /// Full fine-tuning.
    #[default]
    All,
    /// Inference, or a frozen base under adapters.
    Nothing,
    /// These Hugging Face names only.
    Only(BTreeSet<String>),
}

impl Trainable {
    pub fn includes(&self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::Nothing => false,
            Trainable::Only(names) => names.contains(name),
        }
    }
}

/// LoRA adapters on linear layers (PEFT's `LoraConfig`): `W x + scaling * B A dropout(x)`, with
/// A (rank x in) and B (out x rank) trainable and the base weight as its role says (frozen for
/// LoRA training). Which linears get adapters, and which modules train in full beside them
/// (`modules_to_save`, biases), is whet-shared's [`AdapterPlan`], the rule `derive` counts by.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraOptions {
    pub rank: usize,
    pub alpha: f64,
    /// rsLoRA's `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub use_rslora: bool,
    /// Dropout on each adapter's input while training.
    pub dropout: f64,
    pub plan: AdapterPlan,
    /// Seeds the initialisation of fresh A matrices (`--seed`).
    pub init_seed: u64,
}

impl LoraOptions {
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.rank, self.alpha, self.use_rslora)
    }

    /// Whether the linear layer `prefix` (e.g. `model.layers.0.self_attn.q_proj`) is a target.
    pub fn targets(&self, prefix: &str) -> bool {
        self.plan.adapts(prefix)
    }

    /// The key PEFT saves the trainable parameter `name` under: `base_model.model.<name>`,
    /// except a trained bias of an adapted linear, which PEFT wraps (`<module>.base_layer.bias`).
    pub fn peft_key(&self, name: &str) -> String {
        match name.strip_suffix(".bias") {
            Some(module) if self.targets(module) => peft_key(&format!("{module}.base_layer.bias")),
            _ => peft_key(name),
        }
    }
}

/// LoRA's multiplier of `B A x`: `alpha / rank`, or rsLoRA's `alpha / sqrt(rank)`.
pub fn lora_scaling(rank: usize, alpha: f64, use_rslora: bool) -> f64 {
    let rank = rank.max(1) as f64;
    if use_rslora {
        alpha / rank.sqrt()
    } else {
        alpha / rank
    }
}

/// Where each trainable parameter sits in one flat space of `total` elements, in checkpoint
/// order: parameter i is `offsets[i]..offsets[i] + sizes[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    offsets: Vec<usize>,
    sizes: Vec<usize>,
    total: usize,
}

/// The part of one parameter inside a range of the flat space.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Index of the parameter.
    pub param: usize,
    /// Elements of the (flattened) parameter.
    pub within: Range<usize>,
    /// Where `within` starts, counted from the start of the range asked for.
    pub at: usize,
}

impl FlatLayout {
    pub fn new(sizes: Vec<usize>) -> Self {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for size in &sizes {
            offsets.push(total);
            total += size;
        }
        Self {
            offsets,
            sizes,
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// Parameter `index`'s place in the flat space.
    pub fn range(&self, index: usize) -> Range<usize> {
        self.offsets[index]..self.offsets[index] + self.sizes[index]
    }

    /// The parameters overlapping `range`, in order, each cut to the overlap.
    pub fn pieces(&self, range: Range<usize>) -> impl Iterator<Item = Piece> + '_ {
        // The first parameter that ends after range.start.
        let first = self
            .offsets
            .partition_point(|&o| o <= range.start)
            .saturating_sub(1);
        (first..self.sizes.len())
            .take_while(move |&i| self.offsets[i] < range.end)
            .filter_map(move |i| {
                let own = self.range(i);
                let start = own.start.max(range.start);
                let end = own.end.min(range.end);
                (start < end).then(|| Piece {
                    param: i,
                    within: start - own.start..end - own.start,
                    at: start - range.start,
                })
            })
    }
}

/// The trainable parameters of a model under their Hugging Face names, in checkpoint order,
/// with their flat layout and which of them belong to each decoder layer.
#[derive(Debug, Clone)]
pub struct TrainableParams {
    params: Vec<(String, Var)>,
    names: Arc<[String]>,
    layout: Arc<FlatLayout>,
    /// Indices of decoder layer i's parameters (contiguous: the model is built layer by layer).
    layers: Vec<Range<usize>>,
}

impl TrainableParams {
    pub fn new(params: Vec<(String, Var)>, layers: Vec<Range<usize>>) -> Self {
        let names: Arc<[String]> = params.iter().map(|(n, _)| n.clone()).collect();
        let layout = Arc::new(FlatLayout::new(
            params.iter().map(|(_, v)| v.elem_count()).collect(),
        ));
        Self {
            params,
            names,
            layout,
            layers,
        }
    }

    /// Parameters outside any decoder layer (tests, standalone optimizers).
    pub fn from_vars(params: Vec<(String, Var)>) -> Self {
        Self::new(params, Vec::new())
    }

    pub fn as_slice(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn names(&self) -> &Arc<[String]> {
        &self.names
    }

    pub fn layout(&self) -> &Arc<FlatLayout> {
        &self.layout
    }

    /// Indices of decoder layer `layer`'s trainable parameters.
    pub fn layer(&self, layer: usize) -> Range<usize> {
        self.layers.get(layer).cloned().unwrap_or(0..0)
    }

    /// Indices before the first decoder layer (the embeddings).
    pub fn before_layers(&self) -> Range<usize> {
        0..self.layers.first().map_or(self.params.len(), |r| r.start)
    }

    /// Indices outside every decoder layer (embeddings, final norm, output projection).
    pub fn outside_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.before_layers().chain(self.after_layers())
    }

    /// Indices after the last decoder layer (final norm, output projection): their gradients
    /// are complete as soon as the loss's own backward is.
    pub fn after_layers(&self) -> Range<usize> {
        self.layers.last().map_or(self.params.len(), |r| r.end)..self.params.len()
    }

    pub fn num_elements(&self) -> usize {
        self.layout.total()
    }
}

/// How parameters are initialised when there is no checkpoint (tests, the demo model).
#[derive(Debug, Clone, Copy)]
pub(super) enum Init {
    /// N(0, std), the projections and embeddings.
    Normal,
    /// RMSNorm weights.
    Ones,
    /// Biases.
    Zeros,
}

/// Where a model's weights come from.
pub enum WeightSource {
    /// Fresh N(0, 0.02) weights, reproducible from the seed.
    Random { seed: u64 },
    /// Named tensors in memory (tests, conversions).
    Tensors(HashMap<String, Tensor>),
    /// Memory-mapped files; a name is taken from the first set that has it (a checkpoint's f32
    /// masters before its narrower model.safetensors).
    Files(Vec<MappedWeights>),
}

impl WeightSource {
    /// Whether a model folder holds weights (`model.safetensors` or a sharded index).
    pub fn has_weights(dir: &std::path::Path) -> bool {
        dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists()
    }

    /// A model folder's weights, memory-mapped; a folder with only config.json (the demo) stands
    /// for the base `whet sft` initialises at random from `seed`.
    pub fn of_model_dir(
        dir: &std::path::Path,
        seed: u64,
    ) -> std::result::Result<WeightSource, crate::tensor_files::TensorFileError> {
        if Self::has_weights(dir) {
            Ok(WeightSource::Files(vec![MappedWeights::open_model_dir(
                dir,
            )?]))
        } else {
            Ok(WeightSource::Random { seed })
        }
    }
}

/// Hands out the model's parameters while it is built, in checkpoint order, giving each its
/// role, and records which trainable ones each decoder layer owns.
pub(super) struct ParamBuilder {
    source: WeightSource,
    random: RandomNormal,
    taken: BTreeSet<String>,
    device: Device,
    compute_dtype: DType,
    master_dtype: DType,
    trainable: Trainable,
    lora: Option<LoraOptions>,
    /// QLoRA: the frozen decoder linears quantized at load ([`is_quantized_linear`]).
    quantization: Option<QuantOptions>,
    /// Made on first use, with the lookup tables on the model's device.
    quantizer: Option<Quantizer>,
    /// An existing adapter (PEFT's `adapter_model.safetensors`) to start from.
    adapter: Option<MappedWeights>,
    all: Vec<(String, Param)>,
    trainable_params: Vec<(String, Var)>,
    layers: Vec<Range<usize>>,
}

/// The key PEFT saves an adapter tensor under.
pub fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

impl ParamBuilder {
    pub(super) fn new(source: WeightSource, options: &super::ModelOptions) -> Self {
        let seed = match &source {
            WeightSource::Random { seed } => *seed,
            _ => 0,
        };
        Self {
            source,
            random: RandomNormal { state: seed },
            taken: BTreeSet::new(),
            device: options.device.clone(),
            compute_dtype: options.compute_dtype,
            master_dtype: options.master_dtype,
            trainable: options.trainable.clone(),
            lora: options.lora.clone(),
            quantization: options.quantization,
            quantizer: None,
            adapter: None,
            all: Vec::new(),
            trainable_params: Vec::new(),
            layers: Vec::new(),
        }
    }

    pub(super) fn with_adapter(mut self, adapter: Option<MappedWeights>) -> Self {
        self.adapter = adapter;
        self
    }

    pub(super) fn lora(&self) -> Option<&LoraOptions> {
        self.lora.as_ref()
    }

    /// A LoRA matrix `name` (`<linear>.lora_A.weight` / `.lora_B.weight`), always trainable, in
    /// the master dtype: from the adapter when one was given, else PEFT's initialisation (A
    /// Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero).
    pub(super) fn adapter_matrix(
        &mut self,
        name: &str,
        shape: &[usize],
        zero: bool,
    ) -> std::result::Result<Var, ModelError> {
        let tensor = match &self.adapter {
            Some(adapter) => {
                let key = peft_key(name);
                if !adapter.contains(&key) {
                    return Err(ModelError::MissingTensor { name: key });
                }
                self.taken.insert(key.clone());
                adapter.load(&key, &self.device)?
            }
            None => {
                let n: usize = shape.iter().product();
                let bound = 1.0 / (shape[1] as f64).sqrt();
                // Each matrix from its own stream: the init does not depend on build order.
                let seed = self.lora.as_ref().map_or(0, |l| l.init_seed);
                let mut random = RandomNormal {
                    state: seed ^ super::lora::module_key(name),
                };
                let values: Vec<f32> = if zero {
                    vec![0.0; n]
                } else {
                    (0..n)
                        .map(|_| ((random.uniform() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                };
                Tensor::from_vec(values, shape, &self.device)?
            }
        };
        check_shape(name, &tensor, shape)?;
        let var = Var::from_tensor(
            &tensor
                .to_device(&self.device)?
                .to_dtype(self.master_dtype)?,
        )?;
        self.trainable_params.push((name.to_string(), var.clone()));
        Ok(var)
    }

    fn stored(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> std::result::Result<Tensor, ModelError> {
        let device = self.device.clone();
        self.stored_on(name, shape, init, &device)
    }

    fn stored_on(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        device: &Device,
    ) -> std::result::Result<Tensor, ModelError> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let tensor = match &mut self.source {
            WeightSource::Tensors(tensors) => tensors.remove(name).ok_or_else(missing)?,
            WeightSource::Files(sets) => {
                let set = sets.iter().find(|s| s.contains(name)).ok_or_else(missing)?;
                self.taken.insert(name.to_string());
                set.load(name, device)?
            }
            WeightSource::Random { .. } => {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = match init {
                    Init::Normal => (0..n).map(|_| (self.random.next() * 0.02) as f32).collect(),
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                };
                Tensor::from_vec(values, shape, device)?
            }
        };
        check_shape(name, &tensor, shape)?;
        Ok(tensor.to_device(device)?)
    }

    /// A frozen linear weight in 4 bits: read on the host, rounded to the compute dtype (the
    /// weight transformers would quantize), quantized, and the full-precision copy dropped
    /// before the next weight is read, so peak memory stays near the 4-bit size.
    fn quantized(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        options: QuantOptions,
    ) -> std::result::Result<Param, ModelError> {
        let weight = self
            .stored_on(name, shape, init, &Device::Cpu)?
            .to_dtype(self.compute_dtype)?;
        if self.quantizer.is_none() {
            self.quantizer = Some(Quantizer::new(options, &self.device)?);
        }
        let quantizer = self.quantizer.as_ref().expect("made above");
        Ok(Param::Quantized(Arc::new(quantizer.quantize(&weight)?)))
    }

    pub(super) fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> std::result::Result<Param, ModelError> {
        let adapter_key = self
            .lora
            .as_ref()
            .filter(|l| l.plan.trains_in_full(name))
            .map(|l| l.peft_key(name));
        let in_full = adapter_key.is_some();
        if let Some(options) = self.quantization {
            if !in_full && !self.trainable.includes(name) && is_quantized_linear(name) {
                let param = self.quantized(name, shape, init, options)?;
                self.all.push((name.to_string(), param.clone()));
                return Ok(param);
            }
        }
        // A module trained beside the adapters starts from the adapter's copy when it has one.
        let from_adapter = match (&self.adapter, adapter_key) {
            (Some(adapter), Some(key)) if adapter.contains(&key) => {
                self.taken.insert(key.clone());
                let tensor = adapter.load(&key, &self.device)?;
                check_shape(&key, &tensor, shape)?;
                // The base's own copy is superseded, not unexpected.
                match &mut self.source {
                    WeightSource::Files(_) => {
                        self.taken.insert(name.to_string());
                    }
                    WeightSource::Tensors(tensors) => {
                        tensors.remove(name);
                    }
                    WeightSource::Random { .. } => {}
                }
                Some(tensor)
            }
            _ => None,
        };
        let tensor = match from_adapter {
            Some(tensor) => tensor,
            None => self.stored(name, shape, init)?,
        };
        let param = if in_full || self.trainable.includes(name) {
            let var = Var::from_tensor(&tensor.to_dtype(self.master_dtype)?)?;
            self.trainable_params.push((name.to_string(), var.clone()));
            Param::Trainable(var)
        } else {
            Param::Frozen(tensor.to_dtype(self.compute_dtype)?)
        };
        self.all.push((name.to_string(), param.clone()));
        Ok(param)
    }

    /// Builds decoder layer `build`, recording the trainable parameters it took.
    pub(super) fn layer<T>(
        &mut self,
        build: impl FnOnce(&mut Self) -> std::result::Result<T, ModelError>,
    ) -> std::result::Result<T, ModelError> {
        let start = self.trainable_params.len();
        let layer = build(self)?;
        self.layers.push(start..self.trainable_params.len());
        Ok(layer)
    }

    /// The parameters, and an error for checkpoint tensors the model did not take (except a
    /// tied checkpoint's `lm_head.weight` and old rotary `inv_freq` buffers).
    pub(super) fn finish(
        self,
    ) -> std::result::Result<(Vec<(String, Param)>, TrainableParams), ModelError> {
        let leftover: Vec<String> = match &self.source {
            WeightSource::Random { .. } => Vec::new(),
            WeightSource::Tensors(tensors) => tensors.keys().cloned().collect(),
            WeightSource::Files(sets) => sets
                .iter()
                .flat_map(|s| s.names().iter())
                .filter(|n| !self.taken.contains(*n))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let adapter_leftover = self
            .adapter
            .iter()
            .flat_map(|a| a.names().iter())
            .filter(|n| !self.taken.contains(*n))
            .cloned();
        let mut unexpected: Vec<String> = leftover
            .into_iter()
            .chain(adapter_leftover)
            .filter(|name| name != "lm_head.weight" && !name.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(ModelError::UnexpectedTensors {
                names: unexpected.join(", "),
            });
        }
        let trainable = TrainableParams::new(self.trainable_params, self.layers);
        Ok((self.all, trainable))
    }
}

/// A stored tensor must have the shape config.json implies.
fn check_shape(
    name: &str,
    tensor: &Tensor,
    shape: &[usize],
) -> std::result::Result<(), ModelError> {
    if tensor.dims() != shape {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: tensor.dims().to_vec(),
        });
    }
    Ok(())
}

/// Standard normal samples from a seeded generator (splitmix64 + Box-Muller), so that random
/// models are reproducible on every device.
struct RandomNormal {
    state: u64,
}

impl RandomNormal {
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT wraps an adapted linear, so its trained bias is saved as `base_layer.bias`; other
    /// trained-in-full tensors keep their names.
    #[test]
    fn peft_keys_of_trained_biases_and_saved_modules() {
        let sft = whet_shared::SftConfig {
            target_modules: vec!["q_proj".into()],
            lora_bias: "all".into(),
            modules_to_save: vec!["lm_head".into()],
            ..Default::default()
        };
        let lora = LoraOptions {
            rank: 2,
            alpha: 4.0,
            use_rslora: false,
            dropout: 0.0,
            plan: AdapterPlan::from_config(&sft).unwrap(),
            init_seed: 0,
        };
        let q = "model.layers.0.self_attn.q_proj";
        assert_eq!(
            lora.peft_key(&format!("{q}.bias")),
            format!("base_model.model.{q}.base_layer.bias")
        );
        assert_eq!(
            lora.peft_key(&format!("{q}.lora_A.weight")),
            format!("base_model.model.{q}.lora_A.weight")
        );
        let v = "model.layers.0.self_attn.v_proj.bias";
        assert_eq!(lora.peft_key(v), format!("base_model.model.{v}"));
        assert_eq!(
            lora.peft_key("lm_head.weight"),
            "base_model.model.lm_head.weight"
        );
    }

    #[test]
    fn pieces_cut_parameters_to_a_range() {
        let layout = FlatLayout::new(vec![4, 0, 3, 5]);
        assert_eq!(layout.total(), 12);
        let all: Vec<Piece> = layout.pieces(0..12).collect();
        assert_eq!(all.len(), 3, "the empty parameter has no piece");
        let cut: Vec<(usize, Range<usize>, usize)> = layout
            .pieces(2..9)
            .map(|p| (p.param, p.within, p.at))
            .collect();
        assert_eq!(cut, vec![(0, 2..4, 0), (2, 0..3, 2), (3, 0..2, 5)]);
        let inside: Vec<(usize, Range<usize>, usize)> = layout
            .pieces(8..10)
            .map(|p| (p.param, p.within, p.at))
            .collect();
        assert_eq!(inside, vec![(3, 1..3, 0)]);
        assert_eq!(layout.pieces(12..12).count(), 0);
    }
}
