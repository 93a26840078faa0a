// The fuzz build compiles stb's image decoder itself, under the sanitizers and with coverage
// (the main build links Debian's prebuilt libstb instead). PNG and BMP only: JPEG goes to libjpeg-turbo.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "stb_image.h"
#include "stb_image_write.h"
