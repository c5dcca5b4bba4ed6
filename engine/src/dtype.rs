//! The one translation between transformers' dtype names (whet-shared's [`TorchDtype`]) and
//! candle's [`DType`].

use candle_core::DType;
use whet_shared::config::TorchDtype;

pub fn to_candle(dtype: TorchDtype) -> DType {
    match dtype {
        TorchDtype::Float32 => DType::F32,
        TorchDtype::Float16 => DType::F16,
        TorchDtype::Bfloat16 => DType::BF16,
    }
}

/// The torch name of a float dtype whet computes or stores in (`float32` for anything else).
pub fn torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => TorchDtype::Bfloat16.as_str(),
        DType::F16 => TorchDtype::Float16.as_str(),
        _ => TorchDtype::Float32.as_str(),
    }
}

/// A dtype name as transformers writes it in config.json.
pub fn parse(name: &str) -> Option<DType> {
    TorchDtype::from_name(name).map(to_candle)
}
