// cudasim stand-in for <mma.h> (see cudasim.h).
#pragma once
#include "cudasim.h"
