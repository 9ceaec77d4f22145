// Shared by the fuzz targets: write the input to a per-process temporary file.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

inline std::string fuzz_file(const std::string& name, const uint8_t* data, size_t size) {
  std::string path = "/tmp/lmforge-fuzz-" + std::to_string(::getpid()) + "-" + name;
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data), size);
  return path;
}
