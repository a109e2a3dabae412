"""The baseline's URLs: the same publish path as the project's API."""

from django.urls import path

from bench.baseline import views

urlpatterns = [
    path("api/v1/messages/", views.publish),
    path("drf/api/v1/messages/", views.DrfPublish.as_view()),
    path("readyz", views.readyz),
]
