//! `tower::Service` for [`FleetProducer`], so timeouts, concurrency limits,
//! retries and the like stack as ordinary tower layers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use rdkafka::util::Timeout;

use super::{Delivery, FleetProducer, FleetSendError, OwnedRecord};

impl tower::Service<OwnedRecord> for FleetProducer {
    type Response = Delivery;
    type Error = FleetSendError;
    type Future = Pin<Box<dyn Future<Output = Result<Delivery, FleetSendError>> + Send>>;

    /// Always ready: backpressure (hold buffer, librdkafka queue) applies
    /// inside the call. Put a `ConcurrencyLimitLayer` in front to bound the
    /// records in flight.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Sends the record with [`FleetProducer::send_owned`] and no queue
    /// timeout (bound the whole call with a `TimeoutLayer`).
    fn call(&mut self, record: OwnedRecord) -> Self::Future {
        let producer = self.clone();
        Box::pin(async move {
            producer
                .send_owned(record, Timeout::Never)
                .await
                .map_err(|(e, _)| e)
        })
    }
}
