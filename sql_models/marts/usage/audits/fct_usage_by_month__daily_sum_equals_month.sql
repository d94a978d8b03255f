-- The month equals the sum of its days, to the unit, for every customer, meter and dimension.
/* audit
blocking: true
*/
with daily as (
    select * from fct_usage_by_day
    where day >= $start_date::date and day < $end_date::date
),

monthly as (
    select * from fct_usage_by_month
),

by_days as (
    select
        customer_id,
        meter_id,
        dimension,
        sum(usage) as usage,
        sum(gauge_integral) as gauge_integral
    from daily
    group by customer_id, meter_id, dimension
),

final as (
    select
        customer_id,
        meter_id,
        dimension,
        by_days.usage as usage_of_days,
        monthly.usage as usage_of_month,
        by_days.gauge_integral as gauge_integral_of_days,
        monthly.gauge_integral as gauge_integral_of_month
    from by_days
    full outer join monthly
        using (customer_id, meter_id, dimension)
    where by_days.usage is distinct from monthly.usage
        or by_days.gauge_integral is distinct from monthly.gauge_integral
)

select * from final
