// cudasim stand-in for <cuda_runtime.h> (see cudasim.h).
#pragma once
#include "cudasim.h"
