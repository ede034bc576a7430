package dev.idemd.client.servlet;

import jakarta.servlet.ReadListener;
import jakarta.servlet.ServletInputStream;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletRequestWrapper;
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.InputStreamReader;
import java.io.UnsupportedEncodingException;
import java.nio.charset.Charset;
import java.nio.charset.IllegalCharsetNameException;
import java.nio.charset.StandardCharsets;
import java.nio.charset.UnsupportedCharsetException;

/**
 * The request as the handler sees it: the body the filter read (to fingerprint it) is read again
 * from memory through {@link #getInputStream()} or {@link #getReader()}.
 */
final class BufferedRequest extends HttpServletRequestWrapper {
  private final byte[] body;
  private boolean streamTaken;
  private boolean readerTaken;

  BufferedRequest(HttpServletRequest request, byte[] body) {
    super(request);
    this.body = body;
  }

  @Override
  public ServletInputStream getInputStream() {
    if (readerTaken) {
      throw new IllegalStateException("getReader() was already called");
    }
    streamTaken = true;
    return new BodyStream(body);
  }

  @Override
  public BufferedReader getReader() throws UnsupportedEncodingException {
    if (streamTaken) {
      throw new IllegalStateException("getInputStream() was already called");
    }
    readerTaken = true;
    String encoding = getCharacterEncoding();
    Charset charset;
    try {
      // Without a charset parameter: JSON is UTF-8 (RFC 8259), anything else Servlet's default.
      charset =
          encoding != null
              ? Charset.forName(encoding)
              : RequestFingerprint.isJson(getContentType())
                  ? StandardCharsets.UTF_8
                  : StandardCharsets.ISO_8859_1;
    } catch (IllegalCharsetNameException | UnsupportedCharsetException unknown) {
      throw new UnsupportedEncodingException(encoding);
    }
    return new BufferedReader(new InputStreamReader(new ByteArrayInputStream(body), charset));
  }

  @Override
  public int getContentLength() {
    return body.length;
  }

  @Override
  public long getContentLengthLong() {
    return body.length;
  }

  /** A body in memory: always ready, never blocks. */
  private static final class BodyStream extends ServletInputStream {
    private final ByteArrayInputStream bytes;

    BodyStream(byte[] body) {
      this.bytes = new ByteArrayInputStream(body);
    }

    @Override
    public int read() {
      return bytes.read();
    }

    @Override
    public int read(byte[] buffer, int offset, int length) {
      return bytes.read(buffer, offset, length);
    }

    @Override
    public boolean isFinished() {
      return bytes.available() == 0;
    }

    @Override
    public boolean isReady() {
      return true;
    }

    @Override
    public void setReadListener(ReadListener listener) {
      throw new IllegalStateException("the body is already read: asynchronous reads do not apply");
    }
  }
}
