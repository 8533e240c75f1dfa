// A minimal JSON reader: enough for the manifest stexport embeds in a TorchScript file (objects, arrays,
// strings with escapes, numbers, true/false/null). Header-only, no dependencies beyond the standard library.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mini_json {

struct Value {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool has(const std::string& key) const { return type == Type::Object && object.count(key) > 0; }

  const Value& operator[](const std::string& key) const {
    if (!has(key)) throw std::runtime_error("JSON: missing key '" + key + "'");
    return object.at(key);
  }
  const Value& operator[](std::size_t i) const {
    if (type != Type::Array || i >= array.size()) throw std::runtime_error("JSON: index out of range");
    return array[i];
  }
  std::size_t size() const { return type == Type::Array ? array.size() : object.size(); }
  std::int64_t as_int() const {
    if (type != Type::Number) throw std::runtime_error("JSON: expected a number");
    return static_cast<std::int64_t>(number);
  }
  const std::string& as_string() const {
    if (type != Type::String) throw std::runtime_error("JSON: expected a string");
    return string;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  std::size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at offset " + std::to_string(i_));
  }
  void space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(const char* word) {
    std::string w(word);
    if (s_.compare(i_, w.size(), w) != 0) return false;
    i_ += w.size();
    return true;
  }

  Value value() {
    Value v;
    char c = peek();
    if (c == '{') {
      v.type = Value::Type::Object;
      ++i_;
      if (peek() == '}') return ++i_, v;
      while (true) {
        if (peek() != '"') fail("expected a key");
        std::string key = string();
        expect(':');
        v.object[key] = value();
        if (peek() == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.type = Value::Type::Array;
      ++i_;
      if (peek() == ']') return ++i_, v;
      while (true) {
        v.array.push_back(value());
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.type = Value::Type::String;
      v.string = string();
      return v;
    }
    if (literal("true")) { v.type = Value::Type::Bool; v.boolean = true; return v; }
    if (literal("false")) { v.type = Value::Type::Bool; return v; }
    if (literal("null")) return v;
    if (literal("NaN") || literal("Infinity") || literal("-Infinity")) {  // Python's json writes these
      v.type = Value::Type::Number;
      return v;
    }
    std::size_t used = 0;
    try {
      v.number = std::stod(s_.substr(i_, 64), &used);
    } catch (const std::exception&) {
      fail("unexpected character");
    }
    v.type = Value::Type::Number;
    i_ += used;
    return v;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned code = std::stoul(s_.substr(i_, 4), nullptr, 16);
    i_ += 4;
    return code;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {  // a surrogate pair
            i_ += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

}  // namespace mini_json
