// Backward of ROIAlign on the CPU, computing exactly what torchvision's CPU kernel computes.
//
// torchvision loops over (roi, channel, bin) and recomputes the bilinear sampling weights of every
// sample point once per channel. Here the weights of a sample point are computed once and applied
// to every channel. For any one input element the contributions are added in the same order as in
// torchvision (roi, bin row, bin column, sample row, sample column, corner), with the same float
// expressions, so the gradient is bit-identical; channels are independent, so they are split
// across threads without changing that order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
struct Sample {
  T w1, w2, w3, w4;
  int o1, o2, o3, o4;  // offsets of the four corners in one channel's H*W plane; o1 < 0: skip
  int bin;             // ph * pooled_width + pw
};

// torchvision's bilinear_interpolate_gradient, same operations in the same order.
template <typename T>
void corner_weights(int height, int width, T y, T x, Sample<T>& s) {
  if (y < -1.0 || y > height || x < -1.0 || x > width) {
    s.w1 = s.w2 = s.w3 = s.w4 = 0.;
    s.o1 = -1;
    return;
  }
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y;
  int x_low = (int)x;
  int y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = (T)y_low;
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = (T)x_low;
  } else {
    x_high = x_low + 1;
  }
  T ly = y - y_low;
  T lx = x - x_low;
  T hy = 1. - ly, hx = 1. - lx;
  s.w1 = hy * hx;
  s.w2 = hy * lx;
  s.w3 = ly * hx;
  s.w4 = ly * lx;
  s.o1 = y_low * width + x_low;
  s.o2 = y_low * width + x_high;
  s.o3 = y_high * width + x_low;
  s.o4 = y_high * width + x_high;
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& rois, T spatial_scale, int channels,
                   int height, int width, int pooled_height, int pooled_width, int sampling_ratio,
                   bool aligned, at::Tensor& grad_input) {
  const int num_rois = rois.size(0);
  const T* rois_data = rois.data_ptr<T>();
  const T* grad_data = grad.data_ptr<T>();
  T* gin = grad_input.data_ptr<T>();
  const int64_t n_stride = grad.stride(0), c_stride = grad.stride(1);
  const int64_t h_stride = grad.stride(2), w_stride = grad.stride(3);
  const int64_t plane = (int64_t)height * width;

  std::vector<Sample<T>> samples;
  for (int n = 0; n < num_rois; n++) {
    const T* r = rois_data + n * 5;
    int roi_batch_ind = r[0];
    T offset = aligned ? (T)0.5 : (T)0.0;
    T roi_start_w = r[1] * spatial_scale - offset;
    T roi_start_h = r[2] * spatial_scale - offset;
    T roi_end_w = r[3] * spatial_scale - offset;
    T roi_end_h = r[4] * spatial_scale - offset;
    T roi_width = roi_end_w - roi_start_w;
    T roi_height = roi_end_h - roi_start_h;
    if (!aligned) {
      roi_width = std::max(roi_width, (T)1.);
      roi_height = std::max(roi_height, (T)1.);
    }
    T bin_size_h = static_cast<T>(roi_height) / static_cast<T>(pooled_height);
    T bin_size_w = static_cast<T>(roi_width) / static_cast<T>(pooled_width);
    int grid_h = (sampling_ratio > 0) ? sampling_ratio : ceil(roi_height / pooled_height);
    int grid_w = (sampling_ratio > 0) ? sampling_ratio : ceil(roi_width / pooled_width);
    const T count = grid_h * grid_w;

    samples.clear();
    for (int ph = 0; ph < pooled_height; ph++) {
      for (int pw = 0; pw < pooled_width; pw++) {
        for (int iy = 0; iy < grid_h; iy++) {
          const T y = roi_start_h + ph * bin_size_h +
              static_cast<T>(iy + .5f) * bin_size_h / static_cast<T>(grid_h);
          for (int ix = 0; ix < grid_w; ix++) {
            const T x = roi_start_w + pw * bin_size_w +
                static_cast<T>(ix + .5f) * bin_size_w / static_cast<T>(grid_w);
            Sample<T> s;
            corner_weights(height, width, y, x, s);
            s.bin = ph * pooled_width + pw;
            if (s.o1 >= 0) samples.push_back(s);
          }
        }
      }
    }
    const Sample<T>* ss = samples.data();
    const int64_t num_samples = samples.size();
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c++) {
        T* g_in = gin + (roi_batch_ind * channels + c) * plane;
        const T* g_out = grad_data + n * n_stride + c * c_stride;
        for (int64_t k = 0; k < num_samples; k++) {
          const Sample<T>& s = ss[k];
          const int ph = s.bin / pooled_width, pw = s.bin % pooled_width;
          const T g = g_out[ph * h_stride + pw * w_stride];
          g_in[s.o1] += static_cast<T>(g * s.w1 / count);
          g_in[s.o2] += static_cast<T>(g * s.w2 / count);
          g_in[s.o3] += static_cast<T>(g * s.w3 / count);
          g_in[s.o4] += static_cast<T>(g * s.w4 / count);
        }
      }
    });
  }
}

}  // namespace

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned) {
  TORCH_CHECK(grad.device().is_cpu() && rois.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(grad.scalar_type() == rois.scalar_type(), "grad and rois must have one dtype");
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0) return grad_input;
  at::Tensor rois_c = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "kd_det_roi_align_backward", [&] {
    backward_impl<scalar_t>(grad, rois_c, static_cast<scalar_t>(spatial_scale), channels, height,
                            width, pooled_height, pooled_width, sampling_ratio, aligned,
                            grad_input);
  });
  return grad_input;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("roi_align_backward", &roi_align_backward_cpu, "ROIAlign backward (CPU)");
}
