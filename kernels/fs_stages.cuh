// Everything a generated segment kernel includes.
#pragma once
#include "fs_attention.cuh"
#include "fs_gemm_ops.cuh"
#include "fs_pointwise.cuh"
