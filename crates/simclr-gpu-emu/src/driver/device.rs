//! The emulated device: an H100 SXM (compute capability 9.0) as the driver describes it.
//!
//! The limits here are the ones the emulator enforces at launch, so a launch that an H100 would
//! refuse is refused here too (CUDA C++ Programming Guide, "Compute Capabilities", table
//! "Technical Specifications per Compute Capability", column 9.0).

/// Threads per block.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
/// Block dimensions x, y, z.
pub const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
/// Grid dimensions x, y, z.
pub const MAX_GRID_DIM: [u32; 3] = [2_147_483_647, 65_535, 65_535];
/// Static shared memory a block may declare, and the dynamic shared memory a launch may ask for
/// before `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` is raised.
pub const SHARED_PER_BLOCK: u64 = 48 * 1024;
/// Shared memory a block may have once it opts in (227 KiB on sm_90).
pub const SHARED_PER_BLOCK_OPTIN: u64 = 227 * 1024;
/// Streaming multiprocessors of an H100 SXM.
pub const MULTIPROCESSORS: i32 = 132;
/// Device memory the emulated device reports (an H100 80GB HBM3's).
pub const TOTAL_MEMORY: u64 = 85_045_231_616;
/// Compute capability.
pub const COMPUTE_CAPABILITY: (i32, i32) = (9, 0);
/// The device's name: an H100's, saying it is emulated.
pub const NAME: &str = "NVIDIA H100 80GB HBM3 (emulated by simclr-gpu-emu)";
/// `cuDriverGetVersion`: CUDA 13.0.
pub const DRIVER_VERSION: i32 = 13000;

/// The highest `CUdevice_attribute` value (exclusive) of CUDA 13.0's headers.
const ATTRIBUTE_END: i32 = 150;

/// `cuDeviceGetAttribute`: `Some(value)` for a valid attribute.
pub fn attribute(attr: i32) -> Option<i32> {
    let v = match attr {
        1 => MAX_THREADS_PER_BLOCK as i32,
        2..=4 => MAX_BLOCK_DIM[(attr - 2) as usize] as i32,
        5..=7 => MAX_GRID_DIM[(attr - 5) as usize] as i32,
        8 => SHARED_PER_BLOCK as i32,
        9 => 65_536,         // total constant memory
        10 => 32,            // warp size
        11 => 2_147_483_647, // max pitch
        12 => 65_536,        // registers per block
        13 => 1_980_000,     // clock rate, kHz
        14 => 512,           // texture alignment
        15 => 1,             // GPU overlap
        16 => MULTIPROCESSORS,
        17 => 0,          // kernel execution timeout
        18 => 0,          // integrated
        19 => 1,          // can map host memory
        20 => 0,          // compute mode: default
        31 => 1,          // concurrent kernels
        32 => 1,          // ECC
        33 => 0x1b,       // PCI bus id
        34 => 0,          // PCI device id
        36 => 2_619_000,  // memory clock, kHz
        37 => 5120,       // memory bus width
        38 => 52_428_800, // L2 cache bytes
        39 => 2048,       // threads per multiprocessor
        40 => 3,          // async engines
        41 => 1,          // unified addressing
        75 => COMPUTE_CAPABILITY.0,
        76 => COMPUTE_CAPABILITY.1,
        78 => 1,       // stream priorities
        79 | 80 => 1,  // global / local L1 caching
        81 => 233_472, // shared memory per multiprocessor
        82 => 65_536,  // registers per multiprocessor
        83 => 1,       // managed memory
        95 => 1,       // cooperative launch
        97 => SHARED_PER_BLOCK_OPTIN as i32,
        106 => 32,   // blocks per multiprocessor
        111 => 1024, // shared memory reserved by the system per block
        115 => 1,    // memory pools
        a if (1..ATTRIBUTE_END).contains(&a) => 0,
        _ => return None,
    };
    Some(v)
}
