// stexport-host: run a stexport model for libtorch (BUNDLE/model.ts, TorchScript, or BUNDLE/model.pt2, an
// AOTInductor package) on a clip and print the top classes.
//
//   stexport-host MODEL.ts|MODEL.pt2 CLIP [--top-k K] [--device auto|cpu|cuda] [--threads N] [--logits]
//
// CLIP is what `stexport dump-clip VIDEO -m BUNDLE -o clip.npy` writes: a NumPy .npy file holding uint8 RGB
// (V, T, S, S, 3) — V views of T frames, S×S pixels — or (T, S, S, 3) for one view. A headerless file of
// V·T·S·S·3 bytes in that order works too. Like `stexport infer`, each view's logits go through a softmax and
// the views are averaged. --logits also prints every view's raw logits (one line each).
//
// The model takes the clips as they are (normalisation is inside it) and returns float32 logits
// (V, classes). Labels, frames and size come from the manifest stexport embeds: the extra file
// "stexport.json" of a .ts module, the metadata key "stexport.json" of a .pt2 package. A .pt2 package runs
// on the device kind it was compiled for (its manifest's aoti.device); --device must agree.

#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"

namespace {

struct Args {
  std::string model, clip, device = "auto";
  int top_k = 5, threads = 0;
  bool logits = false;
};

const char* kUsage =
    "usage: stexport-host MODEL.ts|MODEL.pt2 CLIP [--top-k K] [--device auto|cpu|cuda] [--threads N] "
    "[--logits]\n"
    "  MODEL.ts   a bundle's TorchScript module (stexport export-torchscript BUNDLE)\n"
    "  MODEL.pt2  or its AOTInductor package (stexport export-aoti BUNDLE)\n"
    "  CLIP       uint8 RGB clips (V, T, S, S, 3) as .npy (stexport dump-clip VIDEO -m BUNDLE -o CLIP)\n"
    "             or headerless bytes in that order\n";

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(s + " needs a value");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--top-k" || s == "-k") {
      a.top_k = std::stoi(next());
    } else if (s == "--device") {
      a.device = next();
    } else if (s == "--threads") {
      a.threads = std::stoi(next());
    } else if (s == "--logits") {
      a.logits = true;
    } else if (!s.empty() && s[0] == '-') {
      throw std::invalid_argument("unknown option " + s);
    } else {
      positional.push_back(s);
    }
  }
  if (positional.size() != 2) throw std::invalid_argument("expected MODEL.ts (or MODEL.pt2) and CLIP");
  a.model = positional[0];
  a.clip = positional[1];
  if (a.top_k < 1) throw std::invalid_argument("--top-k must be at least 1");
  return a;
}

std::string clip_shape(std::int64_t frames, std::int64_t size) {
  const auto t = std::to_string(frames), s = std::to_string(size);
  return "(V, " + t + ", " + s + ", " + s + ", 3)";
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The value after `'key':` in a .npy header (a Python dict literal), up to the next ',' or ')'-closed tuple.
std::string npy_field(const std::string& header, const std::string& key, const std::string& path) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  at = header.find(':', at) + 1;
  while (at < header.size() && header[at] == ' ') ++at;
  auto end = header[at] == '(' ? header.find(')', at) + 1 : header.find(',', at);
  return header.substr(at, end - at);
}

// Clip bytes and shape (V, T, S, S, 3) from a .npy file or headerless bytes of T×S×S×3 per view.
std::vector<std::int64_t> read_clip(const std::string& path, std::int64_t frames, std::int64_t size,
                                    std::string& data) {
  data = read_file(path);
  const std::int64_t per_view = frames * size * size * 3;
  std::vector<std::int64_t> shape;
  if (data.size() >= 10 && data.compare(0, 6, "\x93NUMPY") == 0) {
    const auto major = static_cast<unsigned char>(data[6]);
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    std::size_t len = major == 1 ? p[8] | (p[9] << 8) : p[8] | (p[9] << 8) | (p[10] << 16) | (p[11] << 24);
    std::size_t start = major == 1 ? 10 : 12;
    if (start + len > data.size()) throw std::runtime_error(path + ": truncated .npy header");
    std::string header = data.substr(start, len);
    std::string descr = npy_field(header, "descr", path);
    if (descr != "'|u1'" && descr != "'<u1'" && descr != "'u1'")
      throw std::runtime_error(path + ": holds " + descr + ", not uint8 clips (see stexport dump-clip)");
    if (npy_field(header, "fortran_order", path) != "False")
      throw std::runtime_error(path + ": Fortran-ordered array; save a C-contiguous one");
    std::string dims = npy_field(header, "shape", path);
    for (std::size_t i = 1; i < dims.size();) {
      std::size_t used = 0;
      if (std::isdigit(static_cast<unsigned char>(dims[i]))) {
        shape.push_back(std::stoll(dims.substr(i), &used));
        i += used;
      } else {
        ++i;
      }
    }
    data.erase(0, start + len);
    if (shape.size() == 4) shape.insert(shape.begin(), 1);
  } else {
    if (data.empty() || data.size() % per_view != 0) {
      const auto t = std::to_string(frames), s = std::to_string(size);
      throw std::runtime_error(path + ": " + std::to_string(data.size()) + " bytes is not a whole number " +
                               "of " + t + "x" + s + "x" + s + "x3 uint8 clips");
    }
    shape = {static_cast<std::int64_t>(data.size()) / per_view, frames, size, size, 3};
  }
  if (shape.size() != 5 || shape[1] != frames || shape[2] != size || shape[3] != size || shape[4] != 3)
    throw std::runtime_error(path + ": clips must be " + clip_shape(frames, size) + " uint8 for this model");
  if (static_cast<std::int64_t>(data.size()) != shape[0] * per_view)
    throw std::runtime_error(path + ": file size does not match its .npy shape");
  return shape;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// One interface over the two kinds of model file: load, read the embedded manifest, run.
struct Model {
  virtual ~Model() = default;
  virtual std::string manifest_json() = 0;
  virtual torch::Tensor forward(const torch::Tensor& clips) = 0;
};

struct TorchScriptModel : Model {
  torch::jit::script::Module module;
  std::string json;
  TorchScriptModel(const std::string& path, torch::Device device) {
    torch::jit::ExtraFilesMap extra{{"stexport.json", ""}};
    try {
      module = torch::jit::load(path, device, extra);
    } catch (const c10::Error& e) {
      throw std::runtime_error(path + ": not a loadable TorchScript module (" +
                               std::string(e.what_without_backtrace()).substr(0, 200) + ")");
    }
    module.eval();
    json = extra["stexport.json"];
  }
  std::string manifest_json() override { return json; }
  torch::Tensor forward(const torch::Tensor& clips) override { return module.forward({clips}).toTensor(); }
};

struct AotiModel : Model {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  explicit AotiModel(const std::string& path) {
    try {
      loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": not a loadable AOTInductor package (" +
                               std::string(e.what()).substr(0, 200) + ")");
    }
  }
  std::string manifest_json() override {
    auto meta = loader->get_metadata();
    auto it = meta.find("stexport.json");
    return it == meta.end() ? std::string() : it->second;
  }
  torch::Tensor forward(const torch::Tensor& clips) override { return loader->run({clips}).at(0); }
};

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "stexport-host: error: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    if (args.threads > 0) at::set_num_threads(args.threads);
    torch::Device device = torch::kCPU;
    if (args.device == "cuda" || (args.device == "auto" && torch::cuda::is_available())) {
      if (!torch::cuda::is_available()) throw std::runtime_error("--device cuda: libtorch sees no CUDA GPU");
      device = torch::Device(torch::kCUDA);
    } else if (args.device != "cpu" && args.device != "auto") {
      throw std::runtime_error("--device " + args.device + ": choose auto, cpu or cuda");
    }

    const bool aoti = ends_with(args.model, ".pt2");
    std::unique_ptr<Model> model;
    if (aoti) {
      model = std::make_unique<AotiModel>(args.model);
    } else {
      model = std::make_unique<TorchScriptModel>(args.model, device);
    }
    const std::string json = model->manifest_json();
    if (json.empty()) throw std::runtime_error(args.model + ": no embedded stexport.json; export it with stexport");
    const mini_json::Value manifest = mini_json::parse(json);
    if (aoti) {  // a package runs on the device kind it was compiled for
      const std::string built = manifest.has("aoti") && manifest["aoti"].has("device")
                                    ? manifest["aoti"]["device"].as_string() : "cpu";
      if (args.device == "auto") {
        device = built == "cuda" ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
      } else if (args.device != built) {
        throw std::runtime_error("--device " + args.device + ": " + args.model + " was compiled for " + built);
      }
      if (device.is_cuda() && !torch::cuda::is_available())
        throw std::runtime_error(args.model + " was compiled for cuda: libtorch sees no CUDA GPU");
    }
    // manifest format 2 keeps frames and size in the input record; format 1 (older exports) at the top
    const mini_json::Value& input = manifest.has("input") && manifest["input"].has("frames") ? manifest["input"]
                                                                                            : manifest;
    const std::int64_t frames = input["frames"].as_int(), size = input["size"].as_int();
    std::vector<std::string> labels;
    for (const auto& name : manifest["class_names"].array) labels.push_back(name.as_string());

    std::string bytes;
    std::vector<std::int64_t> shape = read_clip(args.clip, frames, size, bytes);
    torch::Tensor clips = torch::from_blob(bytes.data(), shape, torch::kUInt8).to(device);

    torch::InferenceMode guard;
    const auto start = std::chrono::steady_clock::now();
    torch::Tensor logits = model->forward(clips).to(torch::kCPU, torch::kFloat).contiguous();
    const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - start;
    const auto classes = static_cast<std::int64_t>(labels.size());
    if (logits.dim() != 2 || logits.size(0) != shape[0] || logits.size(1) != classes)
      throw std::runtime_error("the module returned logits of shape " + c10::str(logits.sizes()) + ", not (" +
                               std::to_string(shape[0]) + ", " + std::to_string(classes) + ")");
    torch::Tensor probs = torch::softmax(logits.to(torch::kDouble), 1).mean(0);

    std::string precision = manifest.has("precision") ? manifest["precision"].as_string() : "fp32";
    std::printf("%s: %s (%s, %lld frames of %lld px, %zu classes) on %s\n", args.model.c_str(),
                manifest.has("name") ? manifest["name"].as_string().c_str() : "?", precision.c_str(),
                static_cast<long long>(frames), static_cast<long long>(size), labels.size(),
                device.str().c_str());
    std::printf("%s  (%lld view%s; model %.1f ms)\n", args.clip.c_str(), static_cast<long long>(shape[0]),
                shape[0] == 1 ? "" : "s", ms.count());
    std::vector<std::int64_t> order(labels.size());
    std::iota(order.begin(), order.end(), 0);
    const auto* p = probs.data_ptr<double>();
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return p[a] > p[b]; });
    const int k = std::min<int>(args.top_k, static_cast<int>(labels.size()));
    for (int r = 0; r < k; ++r)
      std::printf("  %d. %-40s %.4f\n", r + 1, labels[order[r]].c_str(), p[order[r]]);
    if (args.logits) {
      const auto l = logits.accessor<float, 2>();
      for (std::int64_t v = 0; v < l.size(0); ++v) {
        std::printf("logits[%lld]", static_cast<long long>(v));
        for (std::int64_t c = 0; c < l.size(1); ++c) std::printf(" %.9g", l[v][c]);
        std::printf("\n");
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "stexport-host: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
