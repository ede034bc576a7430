//! The store's gauges that need the database: record counts by state, from the planner's
//! statistics.

use deadpool_postgres::Object;

use super::errors::from_db;
use super::sql;
use crate::store::StoreError;

/// Estimated live records (in progress, completed): cheap (no scan), as fresh as the last
/// (auto)ANALYZE.
pub async fn estimate_records(client: &Object) -> Result<(f64, f64), StoreError> {
    let row = client
        .query_one(sql::RECORD_ESTIMATE, &[])
        .await
        .map_err(from_db)?;
    let total: f64 = row.try_get::<_, f64>(0).map_err(from_db)?.max(0.0);
    let values: Option<String> = row.try_get(1).map_err(from_db)?;
    let freqs: Option<Vec<f32>> = row.try_get(2).map_err(from_db)?;
    let (mut in_progress, mut completed) = (0.0, 0.0);
    if let (Some(values), Some(freqs)) = (values, freqs) {
        let states = values.trim_matches(|c| c == '{' || c == '}').split(',');
        for (state, freq) in states.zip(freqs) {
            match state.trim() {
                "1" => in_progress = total * f64::from(freq),
                "2" => completed = total * f64::from(freq),
                _ => {}
            }
        }
    }
    Ok((in_progress.round(), completed.round()))
}
