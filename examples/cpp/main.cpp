// Runs an AOTInductor package made by lowrank_kernels.export_aoti on one input tensor, without Python.
//
//   lowrank_aoti_run MODEL.pt2 INPUT.pt OUTPUT.pt [--ops-library PATH]
//
// INPUT.pt holds a tensor written by torch.save in Python; OUTPUT.pt gets the model's output (one
// tensor, or a list when the model returns several), readable with torch.load. Before running, the
// input is checked against the shapes and dtypes recorded in the package, and the lowrank ops the
// package calls against those registered in this process. Every failure is a message on stderr and
// exit status 1 (2 for a wrong command line), never a crash.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <dlfcn.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// A failure with a message for the user.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An exception's message, without the C++ stack trace c10::Error carries.
std::string message(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return c10_error->what_without_backtrace();
  return e.what();
}

std::vector<char> read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Failure(std::string(what) + " " + path + " cannot be opened");
  }
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string part; std::getline(ss, part, sep);) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

std::string shape_string(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// dtype names as export_aoti records them (Python's str(dtype) without "torch.").
const std::map<std::string, at::ScalarType>& dtypes() {
  static const std::map<std::string, at::ScalarType> table = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
      {"int64", at::kLong},    {"int32", at::kInt},      {"int16", at::kShort},  {"int8", at::kChar},
      {"uint8", at::kByte},    {"bool", at::kBool}};
  return table;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : dtypes()) {
    if (type == t) return name;
  }
  return c10::toString(t);
}

using Metadata = std::unordered_map<std::string, std::string>;

Metadata read_metadata(const std::string& package) {
  std::vector<char> head = read_file(package, "model package");
  if (head.size() < 4 || std::string(head.data(), 4) != std::string("PK\x03\x04", 4)) {
    throw Failure(package +
                  " is not an AOTInductor package (.pt2, a zip archive written by "
                  "lowrank_kernels.export_aoti or torch._inductor.aoti_compile_and_package)");
  }
  try {
    return torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
  } catch (const std::exception& e) {
    throw Failure(package + " is a zip archive but not a readable AOTInductor package: " + message(e));
  }
}

// The package calls the lowrank ops through the dispatcher: they must be registered before it loads.
void check_ops_registered(const Metadata& meta) {
  auto it = meta.find("lowrank.ops");
  if (it == meta.end()) return;
  for (const std::string& op : split(it->second, ',')) {
    if (!c10::Dispatcher::singleton().findSchema({op, ""}).has_value()) {
      throw Failure("the package calls " + op +
                    ", which no loaded library registers: link the op library "
                    "(find_package(LowrankKernels), target LowrankKernels::lowrank_ops) or pass --ops-library "
                    "with the path python -c \"import lowrank_kernels; print(lowrank_kernels.ops_library_path())\" "
                    "prints");
    }
  }
}

void check_input(const Metadata& meta, size_t index, const at::Tensor& x) {
  auto shape_it = meta.find("lowrank.input" + std::to_string(index) + ".shape");
  auto dtype_it = meta.find("lowrank.input" + std::to_string(index) + ".dtype");
  if (shape_it == meta.end() || dtype_it == meta.end()) return;  // not made by export_aoti
  std::vector<std::string> dims = split(shape_it->second, ',');
  bool ok = dims.size() == static_cast<size_t>(x.dim());
  std::string want = "[";
  for (size_t d = 0; d < dims.size(); ++d) {
    int64_t e = std::stoll(dims[d]);
    want += (d ? ", " : "") + (e == -1 ? std::string("batch") : dims[d]);
    if (ok && e != -1 && e != x.size(static_cast<int64_t>(d))) ok = false;
    if (ok && e == -1 && x.size(static_cast<int64_t>(d)) == 0) ok = false;
  }
  want += "]";
  auto dt = dtypes().find(dtype_it->second);
  if (dt != dtypes().end() && dt->second != x.scalar_type()) ok = false;
  if (!ok) {
    throw Failure("input " + std::to_string(index) + " has shape " + shape_string(x.sizes()) + " and dtype " +
                  dtype_name(x.scalar_type()) + "; the package was compiled for " + dtype_it->second + " " + want +
                  " (batch: any size >= 1)");
  }
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string ops_library;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--ops-library" && i + 1 < argc) {
      ops_library = argv[++i];
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUT.pt OUTPUT.pt [--ops-library PATH]\n";
    return 2;
  }
  const std::string& package = positional[0];
  const std::string& input_path = positional[1];
  const std::string& output_path = positional[2];

  if (!ops_library.empty() && dlopen(ops_library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    throw Failure("--ops-library: cannot load " + ops_library + ": " + dlerror());
  }
  Metadata meta = read_metadata(package);
  check_ops_registered(meta);

  at::Tensor x;
  try {
    x = torch::jit::pickle_load(read_file(input_path, "input")).toTensor();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    throw Failure("input " + input_path + " is not a tensor saved with torch.save: " + message(e));
  }
  check_input(meta, 0, x);

  // AOTInductor's own shape, stride and device checks, for packages not made by export_aoti.
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
  torch::inductor::AOTIModelPackageLoader loader(package);
  std::vector<at::Tensor> outputs = loader.run({x.contiguous()});

  std::vector<char> bytes =
      outputs.size() == 1 ? torch::jit::pickle_save(outputs[0]) : torch::jit::pickle_save(c10::IValue(outputs));
  std::ofstream out(output_path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw Failure("cannot write " + output_path);
  std::cout << "output " << shape_string(outputs[0].sizes()) << " written to " << output_path << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << message(e) << "\n";
  }
  return 1;
}
