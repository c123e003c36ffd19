// native_loader._engine: the Python face of the I/O engine (engine.h).
//
// This file only converts arguments, releases the GIL while the core blocks, and turns the core's
// exceptions into Python ones:
//   sllm_io::ReadFailure     -> native_loader.reader.ReadError (errno, message, path=, offset=)
//   sllm_io::UnknownTicket   -> KeyError(ticket)
//   sllm_io::EngineClosed    -> RuntimeError
//   sllm_io::BackendUnavailable -> RuntimeError (pybind11's own translation of runtime_error)
//   std::invalid_argument    -> ValueError (pybind11's own translation)
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "engine.h"

namespace py = pybind11;
using namespace pybind11::literals;
using sllm_io::Engine;

namespace {

// A path (str, bytes or os.PathLike) as the bytes the OS sees.
std::string os_path(const py::object& path) {
  PyObject* out = nullptr;
  if (!PyUnicode_FSConverter(path.ptr(), &out)) throw py::error_already_set();
  return std::string(py::reinterpret_steal<py::bytes>(out));
}

// Bytes from the OS (a path, or a message holding one) as Python text, undecodable bytes escaped.
py::str os_text(const std::string& s) {
  PyObject* out = PyUnicode_DecodeFSDefaultAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(out);
}

void set_read_error(const sllm_io::ReadFailure& f) {
  // Imported when needed rather than at module init: the error class lives in the package that
  // imports this module.
  py::object cls = py::module_::import("native_loader.reader").attr("ReadError");
  py::object err = cls(f.err, os_text(f.what()), "path"_a = os_text(f.path), "offset"_a = f.offset);
  PyErr_SetObject(cls.ptr(), err.ptr());
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const sllm_io::ReadFailure& f) {
    try {
      set_read_error(f);
    } catch (py::error_already_set& e) {  // could not build the ReadError: raise why
      e.restore();
    }
  } catch (const sllm_io::UnknownTicket& e) {
    PyErr_SetObject(PyExc_KeyError, py::int_(e.ticket).ptr());
  } catch (const sllm_io::EngineClosed& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

std::int64_t submit(Engine& engine, const py::object& path, std::int64_t file_offset,
                    std::int64_t nbytes, const py::int_& dest) {
  const unsigned long long address = PyLong_AsUnsignedLongLong(dest.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("dest must be a memory address (a non-negative int), got " +
                          std::string(py::str(dest)));
  }
  if (sizeof(void*) < sizeof(address) && address > UINTPTR_MAX) {
    throw py::value_error("dest is not an address on this machine: " + std::string(py::str(dest)));
  }
  return engine.submit(os_path(path), file_offset, nbytes,
                       reinterpret_cast<void*>(static_cast<std::uintptr_t>(address)));
}

sllm_io::Backend parse_backend(const std::string& name) {
  if (name == "auto") return sllm_io::Backend::kAuto;
  if (name == "io_uring") return sllm_io::Backend::kIoUring;
  if (name == "threads") return sllm_io::Backend::kThreads;
  throw py::value_error("backend must be 'auto', 'io_uring' or 'threads', got '" + name + "'");
}

const char* backend_name(sllm_io::Backend backend) {
  return backend == sllm_io::Backend::kIoUring ? "io_uring" : "threads";
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "The C++ I/O engine of native_loader (see native_loader/engine.h).";
  py::register_exception_translator(&translate);

  // One default, kept in reader.py. The package imports reader before this module.
  const int default_threads =
      py::module_::import("native_loader.reader").attr("DEFAULT_THREADS").cast<int>();

  py::class_<Engine>(m, "NativeReader", R"doc(
Reads byte ranges of files into memory through io_uring (one thread keeping many reads in
flight) or with a pool of threads: O_DIRECT where the filesystem allows it and the range is
aligned, buffered reads otherwise. Same API as native_loader.reader.PyReader.

Args:
    threads: reader threads (of the threads backend; io_uring uses one).
    direct: ask for O_DIRECT reads.
    backend: "auto" (io_uring where the kernel allows it, else threads), "io_uring" or "threads".

Raises:
    ValueError: threads out of range, or an unknown backend.
    RuntimeError: backend="io_uring" where io_uring cannot be used.
)doc")
      .def(py::init([](int threads, bool direct, const std::string& backend) {
             return new Engine(threads, direct, parse_backend(backend));
           }),
           "threads"_a = default_threads, "direct"_a = true, "backend"_a = "auto")
      .def("submit", &submit, "path"_a, "file_offset"_a, "nbytes"_a, "dest"_a, R"doc(
Queue a read of ``nbytes`` bytes at ``file_offset`` of ``path`` into memory at address ``dest``.
The caller keeps that memory alive until ``wait`` returns. Returns a ticket.

Raises:
    ValueError: a negative offset or size, or a null destination.
    RuntimeError: the reader is closed.
)doc")
      .def("wait", &Engine::wait, "ticket"_a, py::call_guard<py::gil_scoped_release>(), R"doc(
Block (without the GIL) until a read is done; returns its byte count.

Raises:
    ReadError: the read failed (names the file and the offset).
    KeyError: an unknown or already-waited ticket.
)doc")
      .def("close", &Engine::close, py::call_guard<py::gil_scoped_release>(),
           "Finish the reads already queued and stop the threads.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](Engine& engine, const py::args&) {
             py::gil_scoped_release nogil;
             engine.close();
           })
      .def("__repr__",
           [](const Engine& engine) {
             return "NativeReader(threads=" + std::to_string(engine.threads()) +
                    ", direct=" + (engine.direct() ? "True" : "False") + ", backend='" +
                    backend_name(engine.backend()) + "')";
           })
      .def_property_readonly("threads", &Engine::threads)
      .def_property_readonly("direct", &Engine::direct, "Whether O_DIRECT reads are asked for.")
      .def_property_readonly(
          "backend", [](const Engine& engine) { return backend_name(engine.backend()); },
          "How requests are read: 'io_uring' or 'threads'.")
      .def_property_readonly("direct_bytes", &Engine::direct_bytes,
                             "Bytes read so far through O_DIRECT.")
      .def_property_readonly("buffered_bytes", &Engine::buffered_bytes,
                             "Bytes read so far through the page cache.");
}
