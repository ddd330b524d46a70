// cudasim stand-in for <cooperative_groups.h> (see cudasim.h).
#pragma once
#include "cudasim.h"
