extern "C" __global__ void dummy_aug() {}
