// cudasim stand-in for <cuda_fp16.h> (see cudasim.h).
#pragma once
#include "cudasim.h"
