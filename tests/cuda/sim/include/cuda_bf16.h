// cudasim stand-in for <cuda_bf16.h> (see cudasim.h).
#pragma once
#include "cudasim.h"
