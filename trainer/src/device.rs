//! Choosing where training runs.

use anyhow::{Result, bail};
use candle_core::Device;

/// The compute device for `--device NAME`; says clearly what is missing for CUDA.
pub fn select(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(),
        other => bail!("unknown --device `{other}`: use `cpu` or `cuda`"),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Device::new_cuda(0).map_err(|e| {
        anyhow::anyhow!("--device cuda: no usable CUDA GPU ({e}); check the NVIDIA driver (nvidia-smi) or use --device cpu")
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!(
        "--device cuda: this trainer was built without the `cuda` feature; rebuild with \
         `cargo build --release -p trainer --features cuda` on a machine with the CUDA toolkit, or use --device cpu"
    )
}

/// The device the engine-equality tests train the candle engine on: the GPU in a build with
/// the `cuda` feature, so that `cargo test -p trainer --features cuda` on a GPU machine pins
/// the CUDA path to the sparse engine, and the CPU otherwise (CI). A `cuda` build without a
/// usable GPU fails these tests with `select`'s message rather than passing on the CPU.
#[cfg(test)]
pub fn for_tests() -> Device {
    if cfg!(feature = "cuda") {
        select("cuda").unwrap_or_else(|e| panic!("{e:#}"))
    } else {
        Device::Cpu
    }
}
