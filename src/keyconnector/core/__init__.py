"""The domain core: record formats, the key ring, the key service. It knows no edge."""
