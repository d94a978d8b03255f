-- Usage per customer, meter and dimension for a calendar month: the sum of its UTC days.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, meter_id, dimension]
require_complete_days: true  # a day with raw input and no fct_usage_by_day partition would be billed as zero
*/
with daily as (
    select * from fct_usage_by_day
    where day >= $start_date::date and day < $end_date::date
),

final as (
    select
        $start_date::date as month,
        customer_id,
        meter_id,
        dimension,
        any_value(kind) as kind,
        sum(usage)::decimal(38, 9) as usage,
        sum(gauge_integral)::decimal(38, 9) as gauge_integral,
        sum(gauge_covered_ms)::bigint as gauge_covered_ms,
        max(gauge_peak)::decimal(38, 9) as gauge_peak,
        ($end_ms - $start_ms)::bigint as period_ms,
        count(*)::bigint as days_with_data,
        sum(samples)::bigint as samples,
        sum(dropped_samples)::bigint as dropped_samples,
        sum(resets)::bigint as resets,
        sum(reappeared_series)::bigint as reappeared_series
    from daily
    group by customer_id, meter_id, dimension
)

select * from final
