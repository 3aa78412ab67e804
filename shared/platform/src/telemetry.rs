//! Logs and traces.
//!
//! [`init`] installs the global subscriber: JSON lines (production) or readable output
//! (development), filtered by `log.level`, plus an OpenTelemetry layer exporting over OTLP/HTTP
//! when `telemetry.otlp_endpoint` is set. Only binaries call it; libraries and tests never install
//! globals. [`inject`] and [`extract`] carry W3C trace context in NATS headers so one trace follows
//! an event across services.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, LogSettings, TelemetrySettings};

/// Keeps the trace exporter alive; flushes it on drop.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("trace exporter shutdown: {e}");
            }
        }
    }
}

/// Installs the global subscriber and the panic hook ([`crate::panics`]). Call once, from `main`.
pub fn init(
    service: &'static str,
    log: &LogSettings,
    telemetry: &TelemetrySettings,
) -> anyhow::Result<TelemetryGuard> {
    crate::panics::install(service);
    let filter = EnvFilter::try_new(&log.level)?;
    let fmt_layer = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .flatten_event(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().boxed(),
    };
    let (otel_layer, provider) = match &telemetry.otlp_endpoint {
        Some(endpoint) => {
            let provider = tracer_provider(service, endpoint, telemetry.sample_ratio)?;
            let tracer = provider.tracer(service);
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
            opentelemetry::global::set_tracer_provider(provider.clone());
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// A tracer provider exporting to `endpoint` over OTLP/HTTP (protobuf), batched on its own thread.
pub fn tracer_provider(
    service: &'static str,
    endpoint: &str,
    sample_ratio: f64,
) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build())
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's trace context into NATS headers (`traceparent`, `tracestate`).
pub fn inject(headers: &mut async_nats::HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// The current span's `traceparent`, when there is an active trace.
pub fn current_traceparent() -> Option<String> {
    let mut headers = async_nats::HeaderMap::new();
    inject(&mut headers);
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

/// Makes `span` a child of the trace context found in NATS headers, if any.
pub fn extract_into(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(headers) = headers {
        let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(context);
    }
}

/// Makes `span` a child of the trace context in NATS headers, or else of `traceparent` (the
/// copy a [`voicerooms_contract::RoomEvent`] carries in its payload, e.g. read back from the
/// stream without headers).
pub fn extract_or_traceparent(
    span: &tracing::Span,
    headers: Option<&async_nats::HeaderMap>,
    traceparent: Option<&str>,
) {
    if headers.is_some_and(|h| h.get("traceparent").is_some()) {
        extract_into(span, headers);
    } else if let Some(tp) = traceparent {
        let mut carrier = async_nats::HeaderMap::new();
        carrier.insert("traceparent", tp);
        extract_into(span, Some(&carrier));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn trace_context_crosses_nats_headers() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let publisher = tracing::info_span!("publish");
            let mut headers = async_nats::HeaderMap::new();
            let sent_trace = publisher.in_scope(|| {
                inject(&mut headers);
                tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .trace_id()
            });
            let traceparent = headers
                .get("traceparent")
                .expect("traceparent header")
                .as_str();
            assert!(
                traceparent.contains(&sent_trace.to_string()),
                "{traceparent}"
            );

            let consumer = tracing::info_span!("consume");
            extract_into(&consumer, Some(&headers));
            let received_trace = consumer.context().span().span_context().trace_id();
            assert_eq!(received_trace, sent_trace);
        });
    }

    #[test]
    fn a_payload_traceparent_is_used_when_headers_have_none() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("consume");
            extract_or_traceparent(
                &span,
                None,
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            );
            let trace = span.context().span().span_context().trace_id();
            assert_eq!(trace.to_string(), "0af7651916cd43dd8448eb211c80319c");
        });
    }

    #[test]
    fn no_active_trace_means_no_header() {
        let mut headers = async_nats::HeaderMap::new();
        inject(&mut headers);
        assert!(headers.get("traceparent").is_none());
        assert!(current_traceparent().is_none());
    }
}
