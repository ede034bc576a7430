package dev.idemd.client.servlet;

import jakarta.servlet.ServletOutputStream;
import jakarta.servlet.WriteListener;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpServletResponseWrapper;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.OutputStreamWriter;
import java.io.PrintWriter;
import java.io.UnsupportedEncodingException;
import java.nio.charset.Charset;
import java.nio.charset.StandardCharsets;

/**
 * The response as the handler writes it: status and headers go to the container's response (they
 * are sent only if the handler's response is), the body is held in memory until the filter knows
 * whether to store it, and nothing is committed meanwhile. {@link #sendError} and {@link
 * #sendRedirect} are recorded rather than committed, so the response can still be stored.
 */
final class CapturedResponse extends HttpServletResponseWrapper {
  private final ByteArrayOutputStream body = new ByteArrayOutputStream();
  private ServletOutputStream stream;
  private PrintWriter writer;
  private Integer errorStatus;
  private String errorMessage;

  CapturedResponse(HttpServletResponse response) {
    super(response);
  }

  @Override
  public ServletOutputStream getOutputStream() {
    if (writer != null) {
      throw new IllegalStateException("getWriter() was already called");
    }
    if (stream == null) {
      stream = new BodyStream(body);
    }
    return stream;
  }

  @Override
  public PrintWriter getWriter() throws UnsupportedEncodingException {
    if (stream != null) {
      throw new IllegalStateException("getOutputStream() was already called");
    }
    if (writer == null) {
      String encoding = getCharacterEncoding();
      Charset charset;
      try {
        charset = encoding == null ? StandardCharsets.ISO_8859_1 : Charset.forName(encoding);
      } catch (IllegalArgumentException unknown) {
        throw new UnsupportedEncodingException(encoding);
      }
      writer = new PrintWriter(new OutputStreamWriter(body, charset));
    }
    return writer;
  }

  @Override
  public void sendError(int status, String message) {
    checkNotCommitted();
    body.reset();
    errorStatus = status;
    errorMessage = message;
    super.setStatus(status);
  }

  @Override
  public void sendError(int status) {
    sendError(status, null);
  }

  @Override
  public void sendRedirect(String location) {
    checkNotCommitted();
    body.reset();
    super.setStatus(HttpServletResponse.SC_FOUND);
    super.setHeader("Location", location);
  }

  private void checkNotCommitted() {
    if (super.isCommitted()) {
      throw new IllegalStateException("the response is already committed");
    }
  }

  @Override
  public void flushBuffer() {
    // Held until the filter decides what to send.
    if (writer != null) {
      writer.flush();
    }
  }

  @Override
  public boolean isCommitted() {
    return false;
  }

  @Override
  public void resetBuffer() {
    if (writer != null) {
      writer.flush();
    }
    body.reset();
  }

  @Override
  public void reset() {
    resetBuffer();
    errorStatus = null;
    errorMessage = null;
    super.reset();
  }

  @Override
  public void setBufferSize(int size) {
    // The whole body is held in memory: the container's buffer does not apply.
  }

  @Override
  public void setContentLength(int length) {
    // The filter sets the length of what it sends.
  }

  @Override
  public void setContentLengthLong(long length) {
    // The filter sets the length of what it sends.
  }

  /** The status the handler set. */
  int status() {
    return getStatus();
  }

  /** The body the handler wrote. */
  byte[] body() {
    if (writer != null) {
      writer.flush();
    }
    return body.toByteArray();
  }

  /**
   * Sends the handler's response as it wrote it: the body (or, after {@link #sendError}, the
   * container's error page).
   */
  void sendAsWritten() throws IOException {
    HttpServletResponse response = (HttpServletResponse) getResponse();
    if (errorStatus != null) {
      if (errorMessage == null) {
        response.sendError(errorStatus);
      } else {
        response.sendError(errorStatus, errorMessage);
      }
      return;
    }
    byte[] bytes = body();
    response.setContentLength(bytes.length);
    response.getOutputStream().write(bytes);
  }

  /** The body, written to memory. */
  private static final class BodyStream extends ServletOutputStream {
    private final ByteArrayOutputStream body;

    BodyStream(ByteArrayOutputStream body) {
      this.body = body;
    }

    @Override
    public void write(int b) {
      body.write(b);
    }

    @Override
    public void write(byte[] bytes, int offset, int length) {
      body.write(bytes, offset, length);
    }

    @Override
    public boolean isReady() {
      return true;
    }

    @Override
    public void setWriteListener(WriteListener listener) {
      throw new IllegalStateException("the filter holds the body in memory: no asynchronous writes");
    }
  }
}
