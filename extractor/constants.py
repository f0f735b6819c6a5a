"""The audio and model contract of Qwen2-Audio's encoder, derived from each other.

Everything here follows WhisperFeatureExtractor(feature_size=128) and Qwen2AudioEncoder; see
shared/QWEN2_AUDIO.md. The model's width and depth are *not* here: they come from config.json.
"""

SAMPLE_RATE = 16_000  # Hz: the encoder's only input rate
N_FFT = 400  # samples in one STFT frame (25 ms)
HOP_LENGTH = 160  # samples between STFT frames (10 ms)
CHUNK_SECONDS = 30  # the encoder's fixed window
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
MEL_FLOOR = 1e-10  # power floor before log10
LOG_MEL_DYNAMIC_RANGE = 8.0  # log10 units kept below the window's maximum

CONV_STRIDE = 2  # conv2 halves the mel frames into encoder tokens
POOL_STRIDE = 2  # avg_pooler halves the tokens into output frames
MAX_TOKENS = N_FRAMES // CONV_STRIDE  # 1500 encoder tokens per window
OUTPUT_FRAME_RATE_HZ = SAMPLE_RATE / (HOP_LENGTH * CONV_STRIDE * POOL_STRIDE)  # 25.0 frames/s (40 ms)


# The window-shape formulas: each works on an int or elementwise on a numpy integer array.


def mel_frames(num_samples):
    """Mel frames the feature extractor marks valid: its attention mask is `[::HOP_LENGTH]`."""
    return -(-num_samples // HOP_LENGTH)


def encoder_tokens(n_mel):
    """Tokens after conv2 (stride 2, pad 1) for `n_mel` valid mel frames (n_mel >= 1)."""
    return (n_mel - 1) // CONV_STRIDE + 1


def output_frames(n_tokens):
    """Output frames after avg_pooler (kernel 2, stride 2): floor division makes it 0 for 0 or 1 token."""
    return (n_tokens - POOL_STRIDE) // POOL_STRIDE + 1
